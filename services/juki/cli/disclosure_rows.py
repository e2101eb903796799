"""A disclosure's rows as the resident reads them: the same words in every format, and the words
``juki proof verify`` checks a shown provision against (the record in the access log's leaf).

Shared by ``juki disclose`` (which writes them) and ``juki proof verify`` (which re-derives them from the
logged record), so that the verifier can be run by the program that writes the document, too.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.disclosure.v1 import disclosure_pb2
from juki.domain import JAPAN_TIME
from juki.mesh.settings import spiffe_id

QUERY_MODE_LABELS = {
    common_pb2.QUERY_MODE_BY_CODE: "住民票コードによる照会",
    common_pb2.QUERY_MODE_BY_FOUR_ITEMS: "基本4情報による検索",
    common_pb2.QUERY_MODE_BATCH_VERIFY: "一括照会",
    common_pb2.QUERY_MODE_CHANGE_FEED: "異動情報の提供",
    common_pb2.QUERY_MODE_WIDE_AREA_COPY: "住民票の写しの広域交付",
    common_pb2.QUERY_MODE_DISCLOSURE: "本人開示",
    common_pb2.QUERY_MODE_CARD_USE: "住基カードの利用",
}
FIELD_LABELS = {
    common_pb2.FIELD_RESIDENT_CODE: "住民票コード",
    common_pb2.FIELD_NAME: "氏名",
    common_pb2.FIELD_BIRTH_DATE: "生年月日",
    common_pb2.FIELD_SEX: "性別",
    common_pb2.FIELD_ADDRESS: "住所",
    common_pb2.FIELD_CHANGE_INFO: "異動情報",
}
TIER_LABELS = {common_pb2.TIER_MUNICIPALITY: "市町村", common_pb2.TIER_PREFECTURE: "都道府県",
               common_pb2.TIER_NATIONAL: "全国センター（J-LIS）"}
PROVIDER_NAMES = {
    spiffe_id("service", "lookup"): "地方公共団体情報システム機構（本人確認情報照会）",
    spiffe_id("service", "disclosure"): "地方公共団体情報システム機構（本人開示）",
    spiffe_id("service", "card"): "住基カード処理",
}


def stamp(ts: Any) -> str:
    if not (ts.seconds or ts.nanos):
        return "—"
    return str(ts.ToDatetime(tzinfo=dt.UTC).astimezone(JAPAN_TIME).strftime("%Y年%m月%d日 %H:%M:%S"))


def provision_row(p: disclosure_pb2.Provision, resident_code: str) -> dict[str, Any]:
    """One provision as the resident reads it (the same words in every format)."""
    return {
        "記録番号": p.sequence,
        "提供年月日": stamp(p.provided_at),
        "機能区分": QUERY_MODE_LABELS.get(p.query_mode, "—"),
        "利用事由": p.reason,
        "提供事務区分": f"{p.purpose_name}（{p.purpose}）",
        "提供元": PROVIDER_NAMES.get(p.provider, p.provider) + f"［{TIER_LABELS.get(p.provider_tier, '—')}］",
        "提供先": p.recipient_name or p.recipient,
        "提供した情報": "・".join(FIELD_LABELS.get(f, "?") for f in p.fields)
        + (f"（旧住民票コード {p.resident_code} による提供）"
           if p.resident_code and p.resident_code != resident_code else ""),
    }


PROOF_KEY = "透明性ログの証明"
LOG_KEY = "透明性ログ"
