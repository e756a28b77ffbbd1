"""Encoder licences as text a user can act on: the whole licence of a card, and one line per
encoder that says its SPDX expression, whether the weights are for non-commercial use only, and
whether commercial use is allowed.

Data and text only (no torch). The non-commercial test reads the SPDX identifiers (a Creative
Commons ``-NC`` licence), never the prose, so a note such as "trained without non-commercial
data" does not mark clean weights as non-commercial.
"""

from __future__ import annotations

import re

_ID = r"(?:MIT|Apache-\d\.\d|BSD-[0-9A-Za-z.-]+|CC0-1\.0|CC-BY(?:-[A-Z]{2})*-\d\.\d|[A-Z][A-Za-z]*-\d[0-9A-Za-z.+-]*" \
      r"|Unlicense|NOASSERTION|other)"
_EXPRESSION = re.compile(rf"^\(?{_ID}(?:\s+(?:AND|OR|WITH)\s+{_ID})*\)?(?=$|[\s(:;,.])")
_NON_COMMERCIAL = re.compile(r"^CC-BY(?:-[A-Z]{2})*-NC(?:-[A-Z]{2})*-\d\.\d$")
_PERMISSIVE = re.compile(r"^(?:MIT|Apache-\d\.\d|BSD-[0-9A-Za-z.-]+|CC0-1\.0|CC-BY-\d\.\d|CC-BY-SA-\d\.\d|Unlicense)$")
_CARD_PARTS = (("weights", "{}"), ("copyright", "{}"), ("file", "licence file {}"), ("data", "training data: {}"))


def card_licence_text(licence) -> str:
    """The full licence of a model card's ``licence`` field, nothing cut: a string as it is, or
    ``{"spdx", "weights", "copyright", "file", "data"}`` as ``SPDX — weights note — copyright —
    licence file F — training data: ...`` (the SPDX expression first, as :func:`licence_line`
    reads it)."""
    if not isinstance(licence, dict):
        return str(licence or "")
    parts = [str(licence.get("spdx") or "NOASSERTION")]
    parts += [template.format(str(licence[key]).strip()) for key, template in _CARD_PARTS if licence.get(key)]
    return " — ".join(parts)


def spdx_expression(text: str) -> str | None:
    """The SPDX licence expression a licence text starts with (``MIT AND CC-BY-NC-SA-4.0``), or
    None when it starts with none (weights from your own file)."""
    match = _EXPRESSION.match(str(text or "").strip())
    return match.group(0).strip("()") if match else None


def licence_terms(text: str, commercial: bool | None = None) -> dict:
    """``{"spdx", "non_commercial", "commercial"}`` of a licence text. ``commercial`` is what the
    encoder declares (a preset's fact) and wins; else it follows from the SPDX identifiers: no when
    one is a non-commercial (``-NC``) licence, yes when all are permissive, None when unknown."""
    spdx = spdx_expression(text)
    ids = re.findall(_ID, spdx) if spdx else []
    non_commercial = any(_NON_COMMERCIAL.match(i) for i in ids) or (
        commercial is False and (not ids or ids == ["other"]) and "non-commercial" in str(text).lower())
    if commercial is None and ids:
        commercial = False if non_commercial else (True if all(_PERMISSIVE.match(i) for i in ids) else None)
    return {"spdx": spdx, "non_commercial": bool(non_commercial), "commercial": commercial}


def licence_line(text: str, commercial: bool | None = None) -> str:
    """One line per encoder: ``MIT AND CC-BY-NC-SA-4.0 · non-commercial use only · commercial use:
    no``; ``licence of your weights file · commercial use: as that licence says`` when the weights
    are your own."""
    terms = licence_terms(text, commercial)
    named = str(text).strip()
    parts = [named if terms["spdx"] == "other" and len(named) <= 80 else terms["spdx"] or "licence of your weights file"]
    if terms["non_commercial"]:
        parts.append("non-commercial use only")
    verdict = {True: "yes", False: "no"}.get(terms["commercial"])
    if verdict is None:
        verdict = "as your weights file's licence says" if terms["spdx"] is None else "unknown, read the licence"
    elif terms["commercial"] is False and not terms["non_commercial"]:
        verdict += " (read the licence)"
    parts.append(f"commercial use: {verdict}")
    return " · ".join(parts)
