"""View labels: the teacher's logits of seeded augmented views, stored with a unit or added to a finished store,
re-created exactly by readers, checked, converted, and trained on without a teacher."""

import json
import os

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from dfkd import store
from dfkd.distill.augment import normalize
from dfkd.distill.checkpoint import load_model
from dfkd.distill.sources import StoreSource
from dfkd.pipelines.cli import cli
from dfkd.store.units import unit_seed
from dfkd.store.views import ViewRecipe, view_offsets, view_pixels
from dfkd.synth.view_labels import label_store
from tests.distill_helpers import teacher_store, train_digits_teacher


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pt")
    train_digits_teacher(path)
    return path


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


def make_store(path, teacher_path, unit_size=128):
    model, spec, _ = load_model(teacher_path)
    teacher_store(path, model, spec, unit_size=unit_size)
    w = store.open_writer(path)  # a store made by this teacher records its fingerprint, as synthesis does
    return model, spec


def stored_logits_of_views(reader, model, spec, unit, views):
    """The teacher's logits of a unit's views, computed here from the stored images alone."""
    rec = reader.read_unit(unit)
    recipe = ViewRecipe.from_json(reader.meta.view_recipe, "test")
    off = view_offsets(recipe, unit_seed(reader.meta.base_seed, unit), views, len(rec), rec.images.shape[-1])
    images = torch.from_numpy(rec.images)
    out = []
    for v in range(views):
        partners = images[off[:, v, 3].astype(np.int64)] if recipe.mixes else None
        px = view_pixels(images, off[:, v], recipe, partners)
        with torch.no_grad():
            out.append(model(normalize(px, spec.mean, spec.std)))
    return torch.stack(out, 1).numpy()


@pytest.mark.parametrize("suffix", ["zarr", "wds"])
def test_label_stores_the_teachers_answers_on_views_a_reader_recreates(tmp_path, teacher, suffix):
    path = str(tmp_path / f"s.{suffix}")
    model, spec = make_store(path, teacher)
    res = invoke("store", "label", path, "--teacher", teacher, "--views", "3", "--quiet")
    assert res.exit_code == 0, res.output
    n = store.open(path).meta.num_samples
    assert "labelled 12 units" in res.output and f"{3 * n:,} teacher forwards" in res.output
    r = store.open(path)
    assert r.meta.views == 3 and r.meta.view_recipe["mode"] == "flip-crop" and r.meta.view_recipe["pad"] == 1
    assert r.views_complete
    for u in (0, 11):  # the last unit is short
        got = r.read_unit(u).views
        assert got.shape == (len(r.read_unit(u)), 3, 10)
        np.testing.assert_allclose(got, stored_logits_of_views(r, model, spec, u, 3), rtol=1e-5, atol=1e-5)
    # views differ from each other and from the plain image's logits: they are real augmentations
    v = r.read_unit(0).views
    assert not np.allclose(v[:, 0], v[:, 1]) and not np.allclose(v[:, 0], r.read_unit(0).logits)
    info = invoke("store", "info", path)
    assert "3 per image (flip-crop, pad 1), 12/12 finished units labelled" in info.output
    assert invoke("store", "verify", path).exit_code == 0


def test_cutmix_views_paste_a_box_of_another_image_of_the_unit_into_flip_crops_view(tmp_path, teacher):
    path = str(tmp_path / "s.zarr")
    model, spec = make_store(path, teacher)
    res = invoke("store", "label", path, "--teacher", teacher, "--views", "3", "--view-mode", "flip-crop-cutmix",
                 "--quiet")
    assert res.exit_code == 0, res.output
    r = store.open(path)
    assert r.meta.view_recipe["mode"] == "flip-crop-cutmix" and "partner" in r.meta.view_recipe["seed"]
    for u in (0, 11):
        np.testing.assert_allclose(r.read_unit(u).views, stored_logits_of_views(r, model, spec, u, 3), rtol=1e-5,
                                   atol=1e-5)
    mixed = ViewRecipe("flip-crop-cutmix", 1)
    off = view_offsets(mixed, 5, 3, 128, 8)
    np.testing.assert_array_equal(off[..., :3], view_offsets(ViewRecipe("flip-crop", 1), 5, 3, 128))  # same crops
    assert (off[..., 3] != np.arange(128)[:, None]).all() and (off[..., 3] < 128).all()  # another sample of the unit
    area = (off[..., 5] - off[..., 4]) * (off[..., 7] - off[..., 6]) / 64
    assert 0.2 < area.mean() < 0.5 and area.min() == 0 and area.max() > 0.75  # CutMix: shares spread over [0, 1]
    images = torch.from_numpy(r.read_unit(0).images)
    partners = images[off[:, 0, 3].astype(np.int64)]
    crop = ViewRecipe("flip-crop", 1)
    got = view_pixels(images, off[:, 0], mixed, partners)
    plain = view_pixels(images, off[:, 0, :3], crop)
    mate = view_pixels(partners, off[:, 0, :3], crop)
    assert ((got == plain) | (got == mate)).all()  # every pixel is the image's or its partner's, same crop
    assert (got != plain).any() and (got != mate).any()
    with pytest.raises(ValueError, match="partner image"):
        view_pixels(images, off[:, 0], mixed)


def test_resized_crop_views_scale_a_square_of_the_image_back_up_exactly():
    recipe = ViewRecipe("flip-resized-crop", 1)
    off = view_offsets(recipe, 7, 4, 500, 8)
    sides = off[..., 3]
    assert set(np.unique(sides).tolist()) == {6, 7, 8}  # round(0.7 * 8) .. 8
    assert (off[..., 0] + sides <= 8).all() and (off[..., 1] + sides <= 8).all() and 0.4 < off[..., 2].mean() < 0.6
    images = torch.arange(500 * 64, dtype=torch.int32).view(500, 1, 8, 8)
    got = view_pixels(images, off[:, 0], recipe)
    for i in range(0, 500, 50):  # the box sampled at nearest pixels, mirrored where flipped
        y0, x0, flip, side = off[i, 0].tolist()
        pick = np.arange(8) * side // 8
        want = images[i, 0, y0 + pick][:, x0 + pick]
        assert torch.equal(got[i, 0], want.flip(1) if flip else want)
    whole = np.array([[0, 0, 0, 8]])
    assert torch.equal(view_pixels(images[:1], whole, recipe), images[:1])  # the whole image is itself


def test_synth_with_views_equals_labelling_afterwards(tmp_path):
    t = str(tmp_path / "t.pt")
    train_digits_teacher(t, epochs=1)
    common = ["synth", "--teacher", t, "--method", "noise", "--num-images", "40", "--batch-size", "16", "--quiet"]
    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    assert invoke(*common, "--out", a, "--views", "2").exit_code == 0
    assert invoke(*common, "--out", b, "--views", "0").exit_code == 0  # no view labels (the default keeps 8)
    assert not store.open(b).meta.views
    assert invoke("store", "label", b, "--teacher", t, "--views", "2", "--quiet").exit_code == 0
    ra, rb = store.open(a), store.open(b)
    for u in range(3):
        np.testing.assert_array_equal(ra.read_unit(u).views, rb.read_unit(u).views)
        np.testing.assert_array_equal(ra.read_unit(u).images, rb.read_unit(u).images)


def test_killed_labelling_resumes_to_the_same_labels(tmp_path, teacher, monkeypatch):
    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    model, _ = make_store(a, teacher)
    make_store(b, teacher)
    label_store(a, model, 2, show=False)
    from dfkd.store.backends.zarr import ZarrBackend

    real, calls = ZarrBackend.write_views, []

    def dies_on_the_sixth(self, unit, views):
        calls.append(unit)
        if len(calls) == 6:
            raise KeyboardInterrupt  # a kill between units
        real(self, unit, views)
    monkeypatch.setattr(ZarrBackend, "write_views", dies_on_the_sixth)
    with pytest.raises(KeyboardInterrupt):
        label_store(b, model, 2, show=False)
    monkeypatch.setattr(ZarrBackend, "write_views", real)
    assert store.open(b).backend.views_done_mask().sum() == 5
    assert invoke("store", "verify", b).exit_code == 1  # 7 finished units lack their views
    again = invoke("store", "label", b, "--teacher", teacher, "--views", "2")
    assert again.exit_code == 2 and "--resume" in again.output
    res = label_store(b, model, 2, resume=True, show=False)
    assert res["units_labelled"] == 7
    ra, rb = store.open(a), store.open(b)
    for u in range(12):
        np.testing.assert_array_equal(ra.read_unit(u).views, rb.read_unit(u).views)


def test_damaged_views_are_found_and_labelled_again(tmp_path, teacher):
    path = str(tmp_path / "s.zarr")
    model, _ = make_store(path, teacher)
    label_store(path, model, 2, show=False)
    good = store.open(path).read_unit(3).views.copy()
    zarr.open_group(path, mode="r+")["view_logits"][3 * 128 + 5, 1, 2] = 99.0
    res = invoke("store", "verify", path)
    assert res.exit_code == 1 and "unit 3 (samples 384..511) does not match its checksum (view_logits" in res.output
    assert label_store(path, model, 2, resume=True, show=False)["units_labelled"] == 1
    np.testing.assert_array_equal(store.open(path).read_unit(3).views, good)


def test_label_refuses_another_teacher_and_other_settings(tmp_path, teacher):
    path = str(tmp_path / "s.zarr")
    model, spec = make_store(path, teacher)
    meta = store.open(path).meta
    w = store.open_writer(path)  # record the teacher's fingerprint as the synthesis stage does
    from dfkd.synth.teacher import fingerprint
    import dataclasses

    w.backend.group.attrs["dfkd"] = dataclasses.replace(
        meta, provenance={"teacher_fingerprint": fingerprint(model)}).to_json()
    other = str(tmp_path / "other.pt")
    train_digits_teacher(other, epochs=1)
    res = invoke("store", "label", path, "--teacher", other, "--views", "2")
    assert res.exit_code == 2 and "made by another teacher" in res.output
    assert not store.open(path).meta.views  # nothing written
    assert invoke("store", "label", path, "--teacher", teacher, "--views", "2", "-q").exit_code == 0
    res = invoke("store", "label", path, "--teacher", teacher, "--views", "4", "--resume")
    assert res.exit_code == 2 and "already keeps 2 views" in res.output


def test_convert_keeps_views_and_plain_tools_read_them(tmp_path, teacher):
    import webdataset as wds

    src = str(tmp_path / "s.zarr")
    model, _ = make_store(src, teacher)
    label_store(src, model, 2, show=False)
    wds_path, back = str(tmp_path / "s.wds"), str(tmp_path / "back.zarr")
    assert invoke("store", "convert", src, wds_path).exit_code == 0
    assert invoke("store", "convert", wds_path, back).exit_code == 0
    a, b = store.open(src).load_all(), store.open(back).load_all()
    np.testing.assert_array_equal(a.views, b.views)
    g = zarr.open_group(src, mode="r")  # plain zarr
    np.testing.assert_array_equal(g["view_logits"][:128], a.views[:128])
    shards = sorted(os.path.join(wds_path, f) for f in os.listdir(wds_path) if f.endswith(".tar"))
    first = next(iter(wds.WebDataset(shards[0], shardshuffle=False).decode()))  # plain webdataset
    np.testing.assert_array_equal(first["views.npy"], a.views[0])
    assert json.loads(first["json"] if isinstance(first["json"], str) else json.dumps(first["json"]))["index"] == 0


@pytest.mark.parametrize("in_ram", [True, False])
@pytest.mark.parametrize("mode", ["flip-crop", "flip-crop-cutmix", "flip-resized-crop"])
def test_loader_gives_each_image_one_stored_view_per_epoch(tmp_path, teacher, in_ram, mode):
    path = str(tmp_path / "s.zarr")
    model, spec = make_store(path, teacher)
    label_store(path, model, 4, mode=mode, show=False)
    r = store.open(path)
    ds = store.StoreDataset(path, 100, seed=3, views=True, in_ram=in_ram)
    full = r.load_all()
    recipe = ViewRecipe.from_json(r.meta.view_recipe, "test")
    chosen = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        b = next(iter(ds))
        idx = b.indices.numpy()
        # which view each sample got: the stored view logits its batch logits equal
        v = np.array([int(np.flatnonzero((full.views[i] == b.logits[j].numpy()).all(1))[0]) for j, i in enumerate(idx)])
        chosen.append(dict(zip(idx.tolist(), v.tolist())))
        for j, i in enumerate(idx):
            u = i // 128
            lo, hi = r.meta.unit_range(u)
            off = view_offsets(recipe, unit_seed(r.meta.base_seed, u), 4, hi - lo, 8)[i - lo, v[j]]
            mate = torch.from_numpy(full.images[lo + off[3]:lo + off[3] + 1]) if recipe.mixes else None
            px = view_pixels(torch.from_numpy(full.images[i:i + 1]), off[None], recipe, mate)
            assert torch.equal(b.images[j:j + 1], px)  # the view's exact pixels
        assert len(set(v.tolist())) > 1
    ds.set_epoch(0)
    again = next(iter(ds))
    assert torch.equal(again.images, next(iter(store.StoreDataset(path, 100, seed=3, views=True, in_ram=in_ram))).images)
    common = set(chosen[0]) & set(chosen[1])
    assert common and any(chosen[0][i] != chosen[1][i] for i in common)  # epochs draw views anew


def test_distill_on_view_labels_needs_no_teacher(tmp_path, teacher):
    path = str(tmp_path / "s.zarr")
    model, _ = make_store(path, teacher)
    plain = invoke("distill", "--store", path, "--student", "mlp", "--epochs", "1", "--out", str(tmp_path / "p"), "-q")
    assert plain.exit_code == 0 and "view labels" not in plain.output
    res = invoke("distill", "--store", path, "--no-views", "--student", "mlp", "--epochs", "1",
                 "--out", str(tmp_path / "n"), "-q")
    assert res.exit_code == 0
    label_store(path, model, 2, show=False)
    res = invoke("distill", "--store", path, "--student", "mlp", "--student", "lenet5_half", "--epochs", "5", "--optimizer", "adam", "--lr", "0.01", "--temperature", "4",
                 "--eval", "digits", "--out", str(tmp_path / "v"), "-q")
    assert res.exit_code == 0, res.output
    assert "training on the store's view labels: each epoch one of 2 stored flip-crop views" in res.output
    m = json.loads((tmp_path / "v" / "metrics.json").read_text())
    assert m["students"]["mlp"]["final"]["test_top1"] > 0.5
    src = StoreSource(path, 64, views=True)
    assert src.views and src.identity()["views"] is True
    assert not StoreSource(path, 64, views=False).views


def test_views_of_a_partly_labelled_store_are_refused_for_training(tmp_path, teacher, monkeypatch):
    path = str(tmp_path / "s.zarr")
    model, _ = make_store(path, teacher)
    from dfkd.store.backends.zarr import ZarrBackend

    real = ZarrBackend.write_views
    monkeypatch.setattr(ZarrBackend, "write_views", lambda self, u, v: real(self, u, v) if u < 3 else None)
    label_store(path, model, 2, show=False)
    res = invoke("distill", "--store", path, "--student", "mlp", "--epochs", "1", "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "view labels for only some of its finished units" in res.output
    assert "--resume" in res.output
    res = invoke("store", "convert", path, str(tmp_path / "c.wds"))
    assert res.exit_code == 2 and "finish them with `dfkd store label --resume`" in res.output


def test_one_pass_over_a_view_store_equals_each_students_own_run(tmp_path, teacher):
    """Students of one pass share the decoded views and start from the weights they get alone, so each one
    ends exactly where its own run ends."""
    from dfkd.pipelines.jobs import DistillJob, run_distill

    path = str(tmp_path / "s.zarr")
    model, _ = make_store(path, teacher)
    label_store(path, model, 2, show=False)

    def weights(students, out):
        run_distill(DistillJob(path, students, str(tmp_path / out), epochs=2, lr=0.01, progress=False))
        return {s: load_model(str(tmp_path / out / f"{s}.pt"))[0].state_dict() for s in students}

    both = weights(["mlp", "lenet5_half"], "both")
    for s in ("mlp", "lenet5_half"):
        alone = weights([s], s)[s]
        assert all(torch.equal(alone[k], both[s][k]) for k in alone), s
