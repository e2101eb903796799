"""The Japanese font the printed documents embed: IPAex Gothic (IPA Font License v1.0, shipped beside).

reportlab's built-in CID fonts (HeiseiMin, HeiseiKakuGo) are only named in the PDF, never embedded, so a
reader without Japanese fonts shows empty boxes. A TrueType font is embedded (as a subset of the glyphs
used), so a disclosure or a copy prints the same everywhere.
"""

from __future__ import annotations

from pathlib import Path

FONT_NAME = "IPAexGothic"
FONT_FILE = Path(__file__).with_name("ipaexg.ttf")


def japanese_font() -> str:
    """Register the embedded Japanese font with reportlab (once); its name for styles and canvases."""
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont

    if FONT_NAME not in pdfmetrics.getRegisteredFontNames():
        pdfmetrics.registerFont(TTFont(FONT_NAME, str(FONT_FILE)))
    return FONT_NAME
