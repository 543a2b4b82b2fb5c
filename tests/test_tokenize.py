"""``vqfast tokenize`` / ``detokenize`` on small generated images (png/jpg/webp, RGBA/L/P/CMYK, a truncated
file, a non-image) with a tiny random VQModel: the codes are the quantizer's indices, two torchrun (gloo)
processes write the same bytes as one even when a rank is killed and the job restarted, and bad input or a
foreign output folder gets a clear error."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import vqfast
from conftest import TINY_GROUP, build_pair
from vqfast import cli
from vqfast.detokenize import decode_codes, detokenize
from vqfast.tokenize import code_dtype, load_image, read_shard, tokenize

SIZE = 32  # the tiny model's sample_size: resize and crop by default
SHARD_SIZE, BATCH_SIZE = 4, 3  # 24 image files: 6 shards, each in batches of 3 + 1
BAD = {"b/truncated.jpg": "OSError", "b/not_an_image.png": "UnidentifiedImageError"}
CONVERTED = {"a/rgba.png": "RGBA with alpha", "a/gray.jpg": "L", "a/palette.png": "P with alpha", "b/cmyk.jpg": "CMYK"}


def make_images(root: Path) -> None:
    """An imagefolder of 24 image files (2 unreadable) and a text file."""
    rng = np.random.default_rng(0)
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()

    def pixels(height: int, width: int, channels: int = 3) -> np.ndarray:
        # A smooth gradient plus noise: varied codes, and the JPEG artefacts stay small.
        ramp = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 55, height)[:, None, None]
        return np.clip(ramp + rng.normal(0, 30, (height, width, channels)), 0, 255).astype(np.uint8)

    for i in range(6):
        Image.fromarray(pixels(SIZE, SIZE)).save(root / "a" / f"{i:02d}.png")
        Image.fromarray(pixels(40, SIZE)).save(root / "b" / f"{i:02d}.jpg", quality=90)  # taller: cropped
        Image.fromarray(pixels(SIZE, 48)).save(root / "b" / f"{i:02d}.webp", lossless=True)  # wider: resized
    Image.fromarray(pixels(SIZE, SIZE, 4)).save(root / "a/rgba.png")
    Image.fromarray(pixels(64, 64)[..., 0]).save(root / "a/gray.jpg")  # larger: resized down
    palette = Image.fromarray(pixels(SIZE, SIZE)).quantize(16)
    palette.info["transparency"] = 0
    palette.save(root / "a/palette.png")
    Image.fromarray(pixels(SIZE, SIZE)).convert("CMYK").save(root / "b/cmyk.jpg")
    whole = io.BytesIO()
    Image.fromarray(pixels(SIZE, SIZE)).save(whole, "JPEG")
    (root / "b/truncated.jpg").write_bytes(whole.getvalue()[:400])
    (root / "b/not_an_image.png").write_text("not an image")
    (root / "b/notes.txt").write_text("captions")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    make_images(root)
    return root


def save_model(path: Path, seed: int) -> Path:
    _, model = build_pair(dict(TINY_GROUP), seed=seed)  # random weights, a codebook with the latents' spread
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("vqvae"), seed=0)


def run_tokenize(images: Path, output: Path, model: Path, **options) -> dict:
    options = {"shard_size": SHARD_SIZE, "batch_size": BATCH_SIZE, "num_workers": 1, "progress": False} | options
    return tokenize(images, output, str(model), **options)


@pytest.fixture(scope="module")
def reference(images: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A single-process run's output folder (leave it as found)."""
    output = tmp_path_factory.mktemp("reference") / "codes"
    run_tokenize(images, output, model_dir)
    return output


def all_codes(output: Path) -> tuple[torch.Tensor, list[str]]:
    shards = [read_shard(path) for path in sorted(output.glob("*.safetensors"))]
    return torch.cat([codes for codes, _ in shards]), [i for _, ids in shards for i in ids]


def test_codes_are_the_quantizer_indices(reference: Path, images: Path, model_dir: Path):
    manifest = json.loads((reference / "manifest.json").read_text())
    codes, ids = all_codes(reference)
    every = sorted(p.relative_to(images).as_posix() for p in images.rglob("*") if p.is_file())
    assert ids == [i for i in every if i not in BAD and i != "b/notes.txt"]  # sorted, nothing dropped silently
    assert {i: why.split(":")[0] for i, why in manifest["skipped"].items()} == BAD | {"b/notes.txt": "not an image"}
    assert manifest["converted"] == dict(sorted(CONVERTED.items()))
    assert codes.dtype == torch.int16 and codes.shape == (len(ids), SIZE // 2, SIZE // 2)
    assert manifest["images"] == len(ids) and manifest["codes"]["dtype"] == "int16"
    assert [s["images"] for s in manifest["shards"]] == [4, 4, 4, 4, 4, 2]  # the last shard held the two bad files
    assert all(s["latent_shape"] == [s["images"], SIZE // 2, SIZE // 2] for s in manifest["shards"])
    assert manifest["run"]["options"] | {"dtype": "float32"} == {
        "resize": SIZE, "crop": SIZE, "batch_size": BATCH_SIZE, "shard_size": SHARD_SIZE, "dtype": "float32",
        "device": "cpu"}

    model = vqfast.VQModel.from_pretrained(model_dir).eval()
    x = torch.stack([torch.from_numpy(load_image(images / i, SIZE, SIZE)[0]) for i in ids])
    with torch.no_grad():
        _, _, (_, _, indices) = model.quantize(model.encode(x.permute(0, 3, 1, 2) / 127.5 - 1).latents)
    assert torch.equal(codes.long(), indices.view(codes.shape))
    assert len(codes.unique()) > 8  # the codebook is used, not collapsed on a few codes


def test_conversions(images: Path):
    rgba, mode = load_image(images / "a/rgba.png", SIZE, SIZE)
    original = np.asarray(Image.open(images / "a/rgba.png")).astype(float)
    alpha = original[..., 3:] / 255
    over_white = original[..., :3] * alpha + 255 * (1 - alpha)  # alpha composited over white
    assert mode == "RGBA with alpha" and np.abs(rgba - over_white).max() <= 1
    gray, mode = load_image(images / "a/gray.jpg", 16, 8)
    assert mode == "L" and gray.shape == (8, 8, 3) and (gray[..., 0] == gray[..., 2]).all()


def test_torchrun_two_processes_survive_a_killed_rank(reference: Path, images: Path, model_dir: Path, tmp_path: Path):
    """Rank 1 is killed (SIGKILL) after writing its first shard; torchrun stops rank 0; the restarted job
    leaves the finished shards alone and ends with exactly the single-process run's files."""
    output = tmp_path / "codes"
    args = [str(images), str(output), "--model", str(model_dir), "--shard-size", str(SHARD_SIZE), "--batch-size",
            str(BATCH_SIZE), "--no-progress"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    kill_after_first_shard = (
        "import os, signal, sys\n"
        "import vqfast.tokenize as t\n"
        "write = t._write_shard\n"
        "def write_then_die(*args):\n"
        "    write(*args)\n"
        "    if os.environ['RANK'] == '1':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "t._write_shard = write_then_die\n"
        "sys.exit(t.main(sys.argv[1:]))\n"
    )
    killed = subprocess.run([*torchrun, "--no-python", sys.executable, "-c", kill_after_first_shard, *args],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0, killed.stderr[-3000:]
    finished = {p.name: p.stat().st_mtime_ns for p in output.glob("*.safetensors")}
    # Shards go round-robin: rank 1 had 1, 3 and 5, and died after 1.
    assert "shard-00001-of-00006.safetensors" in finished and "shard-00003-of-00006.safetensors" not in finished
    assert not (output / "manifest.json").exists()

    restarted = subprocess.run([*torchrun, "-m", "vqfast.tokenize", *args], capture_output=True, text=True, timeout=300)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert {name: (output / name).stat().st_mtime_ns for name in finished} == finished  # not written again
    assert sorted(p.name for p in output.iterdir()) == sorted(p.name for p in reference.iterdir())
    for path in reference.iterdir():
        assert (output / path.name).read_bytes() == path.read_bytes(), path.name


def test_rerun_resumes_and_refuses_another_run(reference: Path, images: Path, model_dir: Path, tmp_path: Path):
    output = tmp_path / "codes"
    shutil.copytree(reference, output)
    (output / "shard-00002-of-00006.safetensors").unlink()
    (output / "shard-00003-of-00006.safetensors.tmp").write_bytes(b"half a shard")  # a killed run's
    kept = {p.name: p.stat().st_mtime_ns for p in output.glob("*.safetensors")}
    run_tokenize(images, output, model_dir)
    assert {name: (output / name).stat().st_mtime_ns for name in kept} == kept
    for path in reference.iterdir():
        assert (output / path.name).read_bytes() == path.read_bytes(), path.name

    with pytest.raises(ValueError, match=r"different run .*options\.batch_size: 3 there, 5 here"):
        run_tokenize(images, output, model_dir, batch_size=5)
    with pytest.raises(ValueError, match=r"different run .*model\.weights_sha256"):
        run_tokenize(images, output, save_model(tmp_path / "other", seed=1))
    (images / "b/new.png").write_bytes((images / "a/00.png").read_bytes())
    try:
        with pytest.raises(ValueError, match=r"different run .*inputs\.files: 25 there, 26 here"):
            run_tokenize(images, output, model_dir)
    finally:
        (images / "b/new.png").unlink()


def test_bad_input_and_output_folders(images: Path, model_dir: Path, tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        run_tokenize(tmp_path / "empty", tmp_path / "out", model_dir)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts/a.txt").write_text("a")
    with pytest.raises(ValueError, match=r"holds no images \(1 other files, e.g. a.txt\)"):
        run_tokenize(tmp_path / "texts", tmp_path / "out", model_dir)
    with pytest.raises(ValueError, match="does not exist"):
        run_tokenize(tmp_path / "missing", tmp_path / "out", model_dir)
    with pytest.raises(ValueError, match="must not be inside the input folder"):
        run_tokenize(images, images / "codes", model_dir)
    with pytest.raises(ValueError, match=r"crop \(40\) must not exceed resize \(32\)"):
        run_tokenize(images, tmp_path / "out", model_dir, crop=40)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        run_tokenize(images, tmp_path / "out", model_dir, batch_size=0)
    (tmp_path / "used").mkdir()
    (tmp_path / "used/photo.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="holds photo.jpg, which is no file of a tokenize run"):
        run_tokenize(images, tmp_path / "used", model_dir)
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_model_without_quantizer(images: Path, tmp_path: Path):
    kl = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=2)
    kl.save_pretrained(tmp_path / "kl")
    with pytest.raises(ValueError, match="is a AutoencoderKL, not a VQModel: it has no quantizer"):
        run_tokenize(images, tmp_path / "out", tmp_path / "kl")
    with pytest.raises(ValueError, match="cannot read the model config .*--subfolder vqvae"):
        run_tokenize(images, tmp_path / "out", tmp_path)


def test_code_dtype():
    assert code_dtype(32768) == torch.int16 and code_dtype(32769) == torch.int32


def test_detokenize(reference: Path, images: Path, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    command = ["detokenize", str(reference), str(tmp_path / "out"), "--model", str(model_dir), "--no-progress"]
    assert cli.main(command) == 0
    codes, ids = all_codes(reference)
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert written == sorted(f"{i}.png" for i in ids)
    for i in ids:
        with Image.open(tmp_path / "out" / f"{i}.png") as image:
            assert image.size == (SIZE, SIZE) and image.mode == "RGB"

    # The decoded codes are the decoded latents (which decode quantizes), with or without lookup_from_codebook.
    model = vqfast.VQModel.from_pretrained(model_dir).eval()
    x = torch.stack([torch.from_numpy(load_image(images / i, SIZE, SIZE)[0]) for i in ids[:4]])
    with torch.no_grad():
        decoded = model.decode(model.encode(x.permute(0, 3, 1, 2) / 127.5 - 1).latents).sample
        lookup = vqfast.VQModel.from_config({**model.config, "lookup_from_codebook": True}).eval()
        lookup.load_state_dict(model.state_dict())
        for vq in (model, lookup):
            images_ = decode_codes(vq, codes[:4])
            expected = decoded.add(1).mul(127.5).round().clamp(0, 255).permute(0, 2, 3, 1)
            assert (images_.float() - expected).abs().max() <= 1
    saved = np.array(Image.open(tmp_path / "out" / f"{ids[0]}.png"))
    assert torch.equal(torch.from_numpy(saved), decode_codes(model, codes[:1])[0])

    with pytest.raises(ValueError, match="tokenized by another model"):
        detokenize(reference, tmp_path / "other", str(save_model(tmp_path / "vq1", seed=1)), progress=False)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["tokenize", str(tmp_path / "nothing"), str(tmp_path / "o"), "--model", str(model_dir)])
    assert exit_.value.code == 2 and "vqfast tokenize: error: input folder" in capsys.readouterr().err


def test_detokenize_plain_codes(model_dir: Path, tmp_path: Path):
    """A prior's samples: a file holding only a "codes" tensor; ids are the file's name and the index."""
    samples = torch.randint(0, 64, (2, 4, 6), dtype=torch.int32)
    safetensors.torch.save_file({"codes": samples}, tmp_path / "s.safetensors")
    paths = detokenize(tmp_path / "s.safetensors", tmp_path / "out", str(model_dir), progress=False)
    assert [p.name for p in paths] == ["s.safetensors-000000.png", "s.safetensors-000001.png"]
    assert Image.open(paths[0]).size == (12, 8)
    safetensors.torch.save_file({"codes": torch.full((1, 2, 2), 64)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 64\)"):
        detokenize(tmp_path / "bad.safetensors", tmp_path / "out", str(model_dir), progress=False)
