"""Encoder licences: the whole text of a card, and one line a user can act on."""

from __future__ import annotations

import json

from nic_models.cards import read_card
from nic_models.licences import card_licence_text, licence_line, licence_terms, spdx_expression
from nic_models.registry import get_spec, weights_dir


def test_the_shipped_cards_say_non_commercial_where_their_weights_are():
    for name, line in {
        "nic-mtl-v1": "MIT AND CC-BY-NC-SA-4.0 · non-commercial use only · commercial use: no",
        "nic-mtl-v2": "MIT AND CC-BY-NC-SA-4.0 · non-commercial use only · commercial use: no",
        "nic-mtl-v2-no-monuseg": "MIT · commercial use: yes",  # its note says "no non-commercial data"
        "nic-mtl-v3": "Apache-2.0 AND CC-BY-NC-SA-4.0 · non-commercial use only · commercial use: no",
        "nic-mtl-v3-no-monuseg": "Apache-2.0 · commercial use: yes",
        "nic-mtl-v3-no-monuseg-fast": "Apache-2.0 AND MIT · commercial use: yes",  # the default `nic`
        "nic-mtl4-tellez2020": "MIT · commercial use: yes",
        "efficientnet-lite0-imagenet": "Apache-2.0 · commercial use: yes",
    }.items():
        spec = get_spec(name)
        assert licence_line(spec.licence, spec.commercial) == line, name


def test_a_card_licence_is_kept_whole_with_balanced_brackets():
    card = json.loads((weights_dir() / "nic-mtl-v1.json").read_text())
    spec, _, _ = read_card(weights_dir() / "nic-mtl-v1.json")
    text = card_licence_text(card["licence"])
    assert spec.licence == text and text.startswith("MIT AND CC-BY-NC-SA-4.0 — ")
    assert "non-commercial purposes only" in text and "licence file LICENSE-nic-tellez2019" in text
    assert text.count("(") == text.count(")")
    assert card_licence_text({"spdx": "MIT"}) == "MIT" and card_licence_text("Apache-2.0") == "Apache-2.0"


def test_terms_from_spdx_ids_and_declared_facts():
    assert spdx_expression("Apache-2.0 (architecture: timm; weights: Google)") == "Apache-2.0"
    assert spdx_expression("architecture: timm (Apache-2.0); weights: that of the file you supply") is None
    assert spdx_expression("that of the weights file you supply") is None
    assert licence_terms("CC-BY-NC-ND-4.0") == {"spdx": "CC-BY-NC-ND-4.0", "non_commercial": True, "commercial": False}
    assert licence_terms("CC-BY-4.0")["commercial"] is True
    assert licence_terms("GPL-3.0")["commercial"] is None  # not guessed: copyleft terms
    assert licence_line("Apache-2.0 (model card: research use)", False) == (
        "Apache-2.0 · commercial use: no (read the licence)")
    assert licence_line("other (Owkin non-commercial licence)", False) == (
        "other (Owkin non-commercial licence) · non-commercial use only · commercial use: no")
    assert licence_line("that of the weights file you supply") == (
        "licence of your weights file · commercial use: as your weights file's licence says")


def test_the_docs_name_the_real_default_and_the_clean_encoders():
    from pathlib import Path

    from nic_models.registry import DEFAULT_ENCODER

    root = Path(__file__).resolve().parents[2]
    models_doc = (root / "docs" / "models.md").read_text()
    assert f"EncoderSpec(name='{DEFAULT_ENCODER}'" in models_doc
    licence = (root / "README.md").read_text().split("## Licence", 1)[1]
    assert "nic-mtl-v2-no-monuseg" in licence and "efficientnet-lite0-imagenet" in licence
    assert f"`{DEFAULT_ENCODER}` (the default `nic`)" in licence
    expression = "MIT AND Apache-2.0 AND CC-BY-NC-SA-4.0"  # code, the v3 weights, the MoNuSeg-trained weights
    assert expression in licence and f'license = "{expression}"' in (root / "pyproject.toml").read_text()
    assert (root / "models" / "weights" / "LICENSE-efficientnet-lite0-imagenet").read_text().count(
        "Apache License") >= 2
