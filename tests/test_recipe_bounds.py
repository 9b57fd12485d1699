"""Recipes are bounded inputs: alias and merge-key bombs, self-reference, huge files and
out-of-range numbers are refused fast, with the line and key; stage order and the
files stages write are checked; relative paths follow one documented rule."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from penjing import recipes
from penjing.recipes import RecipeError
from penjing.recipes.load import MAX_RECIPE_BYTES, MAX_RECIPE_NODES, beside, find

HEAD = "model: lenet5\ndata: digits\n"


def refused(text: str) -> str:
    start = time.perf_counter()
    with pytest.raises(RecipeError) as info:
        recipes.parse(text, "r.yaml")
    assert time.perf_counter() - start < 2.0, "a bounded recipe must be refused fast"
    return str(info.value)


def test_billion_laughs_is_refused_without_expanding():
    text = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n" for i in range(1, 10))
    assert len(text) < 600
    msg = refused(HEAD + text + "stages:\n  - stage: train\n")
    assert f"more than {MAX_RECIPE_NODES:,} values" in msg and "aliases" in msg


def test_merge_key_bomb_is_refused_without_expanding():
    text = "m0: &m0 {k0: 1, j0: 2}\n" + "".join(
        f"m{i}: &m{i} {{<<: [*m{i - 1}], k{i}: *m{i - 1}, j{i}: *m{i - 1}}}\n"
        for i in range(1, 25))
    msg = refused(HEAD + text + "stages:\n  - stage: train\n")
    assert "merge keys" in msg


def test_a_few_aliases_still_work():
    shared = recipes.parse(HEAD + "stages:\n  - &t {stage: train, epochs: 1}\n  - *t\n",
                           "r.yaml")
    assert [s.epochs for s in shared.stages] == [1, 1]


def test_self_reference_and_deep_nesting_are_refused():
    assert "a recipe cannot contain itself" in refused(HEAD + "stages: &s [*s]\n")
    assert "line 1" in refused("a: " + "[" * 3000 + "]" * 3000 + "\n")


def test_a_file_over_the_size_bound_is_refused_before_parsing(tmp_path):
    text = HEAD + "#" * MAX_RECIPE_BYTES + "\nstages:\n  - stage: train\n"
    assert f"more than a recipe's {MAX_RECIPE_BYTES:,}" in refused(text)
    path = tmp_path / "big.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match="big.yaml: .* bytes, more than"):
        recipes.load(path)


@pytest.mark.parametrize("text, expected", [
    ("stages:\n  - stage: train\n    lr: .inf\n", "line 5: stages[0] (train).lr: must be a "
     "finite number"),
    ("stages:\n  - stage: finetune\n    lr: 1e400\n", "stages[0] (finetune).lr: must be a "
     "finite number"),
    ("seed: 1180591620717411303424\nstages:\n  - stage: train\n", "line 3: seed: must be "
     "less than 4294967296"),
    ("seed: -1\nstages:\n  - stage: train\n", "line 3: seed: must be greater than or equal "
     "to 0, got -1"),
    ("stages:\n  - stage: prune\n    structure: nm\n    n: 1\n    m: 1000000000000\n",
     "line 7: stages[0] (prune).m: must be less than or equal to 256"),
    ("stages:\n  - stage: train\n    epochs: 1180591620717411303424\n",
     "stages[0] (train).epochs: must be less than or equal to 100000"),
])
def test_numbers_out_of_range_name_key_and_line(text, expected):
    assert expected in refused(HEAD + text)


@pytest.mark.parametrize("file", ["../../x.pjz", "/tmp/x.pjz", "a/../../x.pjz", ""])
def test_stage_files_stay_inside_the_output_folder(file):
    msg = refused(HEAD + f"stages:\n  - stage: encode\n    file: '{file}'\n")
    assert "line 5: stages[0] (encode).file: must be a file name inside the output folder" \
        in msg
    assert repr(file) in msg


def test_a_nested_stage_file_is_fine():
    recipe = recipes.parse(HEAD + "stages:\n  - stage: encode\n    file: files/m.pjz\n", "r")
    assert recipe.stages[0].file == "files/m.pjz"


def test_prune_after_quantize_is_refused_at_its_line():
    msg = refused(HEAD + "stages:\n  - stage: quantize\n    method: ptq\n"
                  "  - stage: prune\n    structure: weight\n    sparsity: 0.5\n")
    assert msg.startswith("r.yaml line 6: stages[1] (prune) cannot follow stages[0] "
                          "(quantize, ptq)")
    msg = refused(HEAD + "stages:\n  - stage: quantize\n    method: kmeans\n"
                  "  - stage: quantize\n    method: ptq\n")
    assert "stages[1] (quantize) cannot follow stages[0] (quantize, kmeans)" in msg
    fine = recipes.parse(HEAD + "stages:\n  - stage: quantize\n    method: qat\n"
                         "  - stage: finetune\n  - stage: export\n", "r")
    assert [s.stage for s in fine.stages] == ["quantize", "finetune", "export"]


def test_relative_paths_beside_the_recipe_then_the_current_directory(tmp_path, monkeypatch):
    recipe_dir, cwd = tmp_path / "recipes", tmp_path / "work"
    recipe_dir.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    (cwd / "w.safetensors").write_bytes(b"cwd")
    assert find(recipe_dir, "w.safetensors") == cwd.resolve() / "w.safetensors"
    (recipe_dir / "w.safetensors").write_bytes(b"beside")
    assert find(recipe_dir, "w.safetensors") == recipe_dir.resolve() / "w.safetensors"
    with pytest.raises(FileNotFoundError, match="'x.pt' does not exist beside the recipe"):
        find(recipe_dir, "x.pt")
    # modules: the same order
    (cwd / "where_am_i_26.py").write_text("WHERE = 'cwd'\n")
    (recipe_dir / "where_am_i_26.py").write_text("WHERE = 'beside'\n")
    from penjing.spec import import_object

    with beside(Path(recipe_dir)):
        assert import_object("where_am_i_26:WHERE", "model") == "beside"
    monkeypatch.delitem(sys.modules, "where_am_i_26")
