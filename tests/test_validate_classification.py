"""Bad input: a clear error naming the file and the rule, and a complete report (nothing half-written)."""

import json
import shutil

import pytest
from PIL import Image

from tasks import validate
from tasks.validate import ValidationFailed


def _first(folder, split="train", cls="circle"):
    return sorted((folder / split / cls).glob("*.png"))[0]


def _report():
    return json.loads(open("outputs/classification/validate/report.json").read())


def _rel(path):
    """Paths are reported as the params give them: relative to the project here."""
    return str(path.relative_to(path.cwd())) if path.is_absolute() else str(path)


def _failing(rule_part):
    return [f for r in _report()["checks"] if rule_part in r["rule"] and not r["success"] for f in r["failing"]]


def test_clean_data_passes(project):
    report = validate.run("classification", project.params())
    assert report["success"] and report["n_samples"] == 480


def test_truncated_image(project):
    bad = _first(project.classification)
    bad.write_bytes(bad.read_bytes()[:120])
    with pytest.raises(ValidationFailed, match=rf"every file decodes.*{bad.name}"):
        validate.run("classification", project.params())
    assert _rel(bad) in _failing("decodes")


def test_non_image_file_in_class_folder(project):
    stray = project.classification / "val" / "square" / "notes.txt"
    stray.write_text("not an image")
    with pytest.raises(ValidationFailed, match="notes.txt"):
        validate.run("classification", project.params())
    assert _rel(stray) in _failing("decodes")


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_or_rgba_converted_and_reported(project, mode):
    odd = _first(project.classification)
    Image.open(odd).convert(mode).save(odd)
    report = validate.run("classification", project.params())
    assert report["success"]
    assert any(odd.name in n and f"mode {mode} converted" in n for n in report["notes"])


def test_grayscale_rejected_when_params_say_so(project):
    odd = _first(project.classification, "test", "star")
    Image.open(odd).convert("L").save(odd)
    with pytest.raises(ValidationFailed, match=rf"image is RGB.*{odd.name}"):
        validate.run("classification", project.params(**{"tasks.classification.data.color_mode": "reject"}))


def test_empty_class_folder(project):
    folder = project.classification / "val" / "triangle"
    for f in folder.iterdir():
        f.unlink()
    with pytest.raises(ValidationFailed, match="class 'triangle' in split 'val'"):
        validate.run("classification", project.params())


def test_class_missing_from_a_split(project):
    shutil.rmtree(project.classification / "train" / "star")
    with pytest.raises(ValidationFailed, match="class 'star' in split 'train'"):
        validate.run("classification", project.params())


def test_identical_file_in_two_splits(project):
    src = _first(project.classification, "train", "square")
    shutil.copy(src, project.classification / "test" / "square" / "leaked.png")
    with pytest.raises(ValidationFailed, match="no identical file in two splits"):
        validate.run("classification", project.params())
    assert any("leaked.png" in f for f in _failing("identical"))


def test_undeclared_label(project):
    with pytest.raises(ValidationFailed, match="label in the declared classes"):
        validate.run(
            "classification", project.params(**{"tasks.classification.data.classes": ["circle", "square", "triangle"]})
        )


def test_image_too_small(project):
    small = _first(project.classification, "val", "circle")
    Image.open(small).resize((8, 8)).save(small)
    with pytest.raises(ValidationFailed, match=rf"width within.*{small.name}"):
        validate.run("classification", project.params())


def test_missing_dataset_path(project):
    with pytest.raises(ValidationFailed, match="does not exist"):
        validate.run(
            "classification", project.params(**{"tasks.classification.data.path": str(project.root / "nowhere")})
        )
    assert not _report()["success"]


def test_failed_validation_replaces_report_whole(project):
    validate.run("classification", project.params())
    bad = _first(project.classification)
    bad.write_bytes(b"garbage")
    with pytest.raises(ValidationFailed):
        validate.run("classification", project.params())
    files = sorted(p.name for p in (project.root / "outputs" / "classification" / "validate").iterdir())
    assert files == ["coverage.csv", "report.json", "report.md", "samples.csv"]
    assert "FAILED" in open("outputs/classification/validate/report.md").read()
    assert not list((project.root / "outputs" / "classification").glob(".validate.tmp-*"))


def test_split_from_seed(project):
    flat = project.root / "flat"
    for cls_dir in (project.classification / "train").iterdir():
        shutil.copytree(cls_dir, flat / cls_dir.name)
    params = project.params(
        **{"tasks.classification.data.path": str(flat), "tasks.classification.data.split_from": "seed"}
    )
    report = validate.run("classification", params)
    assert report["success"]
    from cv_models import get_task
    from tasks.config import load_params

    task = get_task("classification", load_params(params).task("classification"))
    sizes = {s: len(task.dataset(s, None)) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == sum(1 for _ in flat.rglob("*.png")) and min(sizes.values()) > 0
