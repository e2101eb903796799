"""Server reflection under both ``grpc.reflection.v1`` and ``grpc.reflection.v1alpha``.

grpcio-reflection ships only v1alpha (its servicer, messages and descriptor). v1 is the same protocol
renamed: the same messages with the same field numbers in package ``grpc.reflection.v1``. So one
servicer answers both, and the v1 service only needs its *descriptor* in the default pool: without
it the service is listed but no client can describe it or resolve its methods ("Symbol not found"),
and a client that speaks only v1 cannot build its schema. The descriptor is derived here from the
v1alpha one rather than vendored as a second generated copy of a proto that is not ours.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

V1_PACKAGE = "grpc.reflection.v1"
V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
V1ALPHA_SERVICE: str = v1alpha_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name


def v1_file_proto() -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto of ``grpc/reflection/v1/reflection.proto``, as upstream publishes it."""
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(proto)
    old_prefix, new_prefix = f".{v1alpha_pb2.DESCRIPTOR.package}.", f".{V1_PACKAGE}."
    proto.name = V1_FILE
    proto.package = V1_PACKAGE
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(old_prefix):
                field.type_name = new_prefix + field.type_name.removeprefix(old_prefix)
    for service in proto.service:
        for method in service.method:
            method.input_type = new_prefix + method.input_type.removeprefix(old_prefix)
            method.output_type = new_prefix + method.output_type.removeprefix(old_prefix)
    # v1alpha is marked deprecated; v1 is its stable successor, with upstream's package options.
    proto.options.Clear()
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    proto.options.java_multiple_files = True
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    return proto


def register_v1_descriptor(pool: descriptor_pool.DescriptorPool | None = None) -> FileDescriptor:
    """Add the v1 descriptor to ``pool`` (the default pool) once; return it.

    A later grpcio-reflection that ships v1 itself registers the same file name first: then that one is
    used as it is.
    """
    pool = pool or descriptor_pool.Default()
    try:
        return pool.FindFileByName(V1_FILE)
    except KeyError:
        pass
    pool.AddSerializedFile(v1_file_proto().SerializeToString())
    return pool.FindFileByName(V1_FILE)
