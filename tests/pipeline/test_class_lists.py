"""Default class lists are the authors' lists name for name; ``spar classes`` prints them."""

from __future__ import annotations

import open_clip
import pytest
from open_clip import OPENAI_IMAGENET_TEMPLATES
from open_clip.tokenizer import get_clean_fn

from pipeline.cli import main
from pipeline.data.datasets import DATASETS, INFOS, ClassNamesError, default_classes, format_classes
from tests.reference_class_lists import REFERENCE_CLASS_FILES


def reference_get_cls_idx(text: str) -> tuple[list[str], list[int]]:
    """The reference's ``get_cls_idx``: readlines, split each line on ', ', strip the newline."""
    lines = text.splitlines(keepends=True)
    names, idx = [], []
    for i, line in enumerate(lines):
        parts = line.split(", ")
        names += [p.replace("\n", "") for p in parts]
        idx += [i] * len(parts)
    return names, idx


@pytest.mark.parametrize("dataset", DATASETS)
def test_default_list_is_the_reference_list_name_for_name(dataset):
    ref_names, ref_idx = reference_get_cls_idx(REFERENCE_CLASS_FILES[dataset])
    ours = default_classes(dataset)
    names = [n for syn in ours for n in syn]
    idx = [c for c, syn in enumerate(ours) for _ in syn]
    assert len(ours) == INFOS[dataset].num_classes == max(ref_idx) + 1
    assert idx == ref_idx
    # names are compared exactly; the one reference name with surrounding white space is Context60's "wood "
    padded = [(i, n) for i, n in enumerate(ref_names) if n != n.strip()]
    assert padded == ([(len(ref_names) - 1, "wood ")] if dataset == "context60" else [])
    assert names == [n.strip() for n in ref_names]


def test_trailing_space_of_wood_changes_no_token():
    # "wood " vs "wood" inside every prompt template: CLIP's tokenizer and SigLIP2's text cleaning
    # (open_clip's "canonicalize") give the same input, so stripping it keeps the reference's text embedding.
    a = [t("wood ") for t in OPENAI_IMAGENET_TEMPLATES]
    b = [t("wood") for t in OPENAI_IMAGENET_TEMPLATES]
    assert a != b
    assert bool((open_clip.tokenize(a) == open_clip.tokenize(b)).all())
    clean = get_clean_fn("canonicalize")
    assert [clean(x) for x in a] == [clean(x) for x in b]


def test_shipped_files_are_the_reference_bytes():
    from importlib import resources

    for ds in DATASETS:
        shipped = (
            resources.files("spar_core.data").joinpath(f"paper/{INFOS[ds].classes_file}").read_text("utf-8")
        )
        assert shipped == REFERENCE_CLASS_FILES[ds], ds


def test_rich_set_is_kept_and_differs():
    for ds in DATASETS:
        rich = default_classes(ds, "rich")
        assert len(rich) == INFOS[ds].num_classes
        assert rich != default_classes(ds)
    assert default_classes("voc20", "rich")[0] == ["aeroplane", "airplane"]
    assert default_classes("cityscapes", "rich")[6] == ["traffic light"]
    assert default_classes("cityscapes")[6] == ["trafficlight"]
    with pytest.raises(ClassNamesError, match="unknown class set 'fancy'; choose one of paper, rich"):
        default_classes("voc21", "fancy")


def test_spar_classes_prints_the_list(capsys):
    assert main(["classes", "voc21"]) == 0
    out = capsys.readouterr().out.splitlines()
    ref_lines = REFERENCE_CLASS_FILES["voc21"].split("\n")
    assert out == ref_lines  # one class a line, synonyms separated by ", "
    assert (
        out[15]
        == "person, person in shirt, person in jeans, person in dress, person in sweater, person in skirt, person in jacket"
    )
    assert main(["classes", "cityscapes", "--set", "rich"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 19 and out[6] == "traffic light"
    assert out == format_classes(default_classes("cityscapes", "rich")).splitlines()
    with pytest.raises(SystemExit):
        main(["classes", "pascal"])
    assert "invalid choice" in capsys.readouterr().err


def test_eval_uses_the_class_set(tmp_path):
    from pipeline.eval.benchmark import benchmark_classes
    from pipeline.eval.config import EvalConfig

    assert benchmark_classes(EvalConfig(dataset="voc20")) == default_classes("voc20")
    assert benchmark_classes(EvalConfig(dataset="voc20", class_set="rich"))[0] == ["aeroplane", "airplane"]
    from pipeline.common.config import ConfigError

    with pytest.raises(ConfigError, match="class_set"):
        EvalConfig(class_set="nope")
