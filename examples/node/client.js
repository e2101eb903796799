#!/usr/bin/env node
// An agency's client of the lookup service, in Node.js with @grpc/grpc-js and @grpc/proto-loader.
//
//   node client.js --endpoints ~/.local/share/juki/endpoints.json --code 12345678901 [--purpose B1-PENSION-BENEFIT]
//
// It calls LookupByCode, streams VerifyBatch as several messages (one item with a wrong check digit,
// answered VERIFY_STATUS_INVALID with its reason while the others are verified), and makes one call the
// service refuses, decoding the `grpc-status-details-bin` trailer into google.rpc.ErrorInfo, BadRequest
// and RetryInfo. Each step prints one JSON line. The mesh knows the caller only by its certificate
// (mutual TLS); the retry policy is the service config of docs/agency-service-config.json.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const ROOT = path.resolve(__dirname, '..', '..');
const INCLUDE = [path.join(ROOT, 'proto'), path.join(ROOT, 'third_party', 'googleapis')];

function parseArgs(argv) {
  const args = { purpose: 'B1-PENSION-BENEFIT', client: 'agency', deadline: 10 };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '');
    if (!(key in { endpoints: 1, code: 1, purpose: 1, client: 1, deadline: 1 }) || argv[i + 1] === undefined) {
      throw new Error(`usage: client.js --endpoints FILE --code CODE [--purpose P] [--client NAME]; bad: ${argv[i]}`);
    }
    args[key] = argv[i + 1];
  }
  if (!args.endpoints || !args.code) throw new Error('--endpoints and --code are required');
  return args;
}

// The rich error model: google.rpc.Status in the trailer, its details as Any.
const errorTypes = new protobuf.Root();
errorTypes.resolvePath = (origin, target) => {
  for (const dir of INCLUDE) {
    const candidate = path.join(dir, target);
    if (fs.existsSync(candidate)) return candidate;
  }
  return protobuf.util.path.resolve(origin, target);
};
errorTypes.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto']);
errorTypes.resolveAll();
const Status = errorTypes.lookupType('google.rpc.Status');

/** Decodes a failed call's status details: code, message, ErrorInfo, BadRequest, RetryInfo. */
function decodeError(error) {
  const decoded = { code: grpc.status[error.code] || error.code, message: error.details };
  const raw = error.metadata && error.metadata.get('grpc-status-details-bin');
  if (!raw || raw.length === 0) return decoded;
  const status = Status.decode(raw[0]);
  for (const any of status.details) {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    let type;
    try {
      type = errorTypes.lookupType(typeName);
    } catch (unknown) {
      continue; // a detail type this client does not know: skip it, as the error model allows
    }
    const detail = type.toObject(type.decode(any.value), { defaults: false });
    if (typeName === 'google.rpc.ErrorInfo') {
      decoded.reason = detail.reason;
      decoded.domain = detail.domain;
      decoded.metadata = detail.metadata || {};
    } else if (typeName === 'google.rpc.BadRequest') {
      decoded.fieldViolations = (detail.fieldViolations || []).map((v) => ({
        field: v.field, description: v.description, reason: v.reason,
      }));
    } else if (typeName === 'google.rpc.RetryInfo') {
      const delay = detail.retryDelay || {};
      decoded.retryDelaySeconds = Number(delay.seconds || 0) + (delay.nanos || 0) / 1e9;
    }
  }
  return decoded;
}

function lookupClient(endpoints, clientName) {
  const definition = protoLoader.loadSync('juki/lookup/v1/lookup.proto', {
    includeDirs: INCLUDE, keepCase: true, longs: String, enums: String, defaults: false, oneofs: true,
  });
  const { LookupService } = grpc.loadPackageDefinition(definition).juki.lookup.v1;
  const identity = endpoints.clients[clientName];
  if (!identity) throw new Error(`endpoints.json has no client identity "${clientName}"`);
  const credentials = grpc.credentials.createSsl(
    fs.readFileSync(endpoints.ca), fs.readFileSync(identity.key), fs.readFileSync(identity.cert));
  const serviceConfig = fs.readFileSync(path.join(ROOT, 'docs', 'agency-service-config.json'), 'utf8');
  // The service certificates name localhost and 127.0.0.1; a target listing several replicas
  // ("ipv4:127.0.0.1:a,127.0.0.1:b") needs the name to check them by.
  return new LookupService(endpoints.services.lookup.address, credentials, {
    'grpc.ssl_target_name_override': 'localhost',
    'grpc.default_authority': 'localhost',
    'grpc.service_config': serviceConfig,
    'grpc.enable_retries': 1,
  });
}

function deadline(seconds) {
  return new Date(Date.now() + seconds * 1000);
}

function lookupByCode(client, request, seconds) {
  return new Promise((resolve, reject) => {
    client.LookupByCode(request, { deadline: deadline(seconds) }, (error, response) => {
      if (error) reject(error); else resolve(response);
    });
  });
}

/** One VerifyBatch stream: writes each message, collects every result, resolves when the server ends. */
function verifyBatch(client, messages, seconds) {
  return new Promise((resolve, reject) => {
    const results = [];
    const call = client.VerifyBatch({ deadline: deadline(seconds) });
    call.on('data', (response) => results.push(...response.results));
    call.on('error', reject);
    call.on('end', () => resolve(results));
    for (const message of messages) call.write(message);
    call.end();
  });
}

function print(step, body) {
  process.stdout.write(`${JSON.stringify({ step, ...body })}\n`);
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const endpoints = JSON.parse(fs.readFileSync(args.endpoints, 'utf8'));
  const client = lookupClient(endpoints, args.client);
  const seconds = Number(args.deadline);
  try {
    const found = await lookupByCode(client, {
      purpose: args.purpose, resident_code: args.code, requested_fields: ['FIELD_NAME', 'FIELD_ADDRESS'],
    }, seconds);
    print('LookupByCode', { provided_fields: found.provided_fields, record: found.record });

    // Three messages on one stream; the purpose goes on the first only. Item 2 has a wrong check digit.
    const wrongCheckDigit = args.code.slice(0, 10) + String((Number(args.code[10]) + 1) % 10);
    const results = await verifyBatch(client, [
      { purpose: args.purpose, items: [{ item_id: 1, resident_code: args.code }] },
      { items: [{ item_id: 2, resident_code: wrongCheckDigit }] },
      { items: [{ item_id: 3, resident_code: args.code }, { item_id: 4, resident_code: '１２３' }] },
    ], seconds);
    print('VerifyBatch', {
      messages: 3,
      results: results.map((r) => ({
        item_id: Number(r.item_id),
        status: r.status,
        reason: r.violation ? r.violation.reason : undefined,
        defect: r.violation ? r.violation.defect : undefined,
        stream_index: r.violation ? Number(r.violation.stream_index) : undefined,
      })),
    });

    // A refused call: a code with a wrong check digit. The reason and the field come from the status
    // details (ErrorInfo, BadRequest), not from the message text.
    try {
      await lookupByCode(client, { purpose: args.purpose, resident_code: wrongCheckDigit }, seconds);
      print('Refused', { unexpected: 'the call succeeded' });
      process.exitCode = 1;
    } catch (error) {
      print('Refused', decodeError(error));
    }
  } catch (error) {
    print('Failed', decodeError(error));
    process.exitCode = 1;
  } finally {
    client.close();
  }
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exitCode = 2;
});
