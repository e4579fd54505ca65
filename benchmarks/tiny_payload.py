"""Pack the flashhead-tiny training data and the device script into a folder for the device (issue #6).

    PYTHONPATH=src python benchmarks/tiny_payload.py --data procedural=/work/data-tiny2/procedural \
        --data portrait=/work/data-tiny2/portrait --data real=/work/data-tiny2/real --out ../main/.device/tiny

writes OUT/data.tar.xz (the shard folders under the given names, plus eval/: the recipe's held-back
portraits already face-cropped at the model size, since the device has no face detector, and the first
`eval.seconds` of its speech as eval/speech.wav) and OUT/run.sh (benchmarks/tiny_run.sh). Refuses to
write an archive over --max-mb.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def eval_members(size: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of the recipe's evaluation portraits (cropped as inference crops) and speech."""
    from PIL import Image

    from flashhead.data.shards import encode_wav
    from flashhead.media.audio_io import load_audio
    from flashhead.media.face import prepare_portrait
    from flashhead.train.tiny import load_recipe

    ev = load_recipe()["eval"]
    members = []
    for name in ev["portraits"]:
        crop = prepare_portrait(Path(ev["portrait_dir"]) / name, crop=True, size=size)
        buffer = io.BytesIO()
        # The file keeps its name (the recipe lists names); PNG for .png, near-lossless JPEG otherwise.
        kind = "PNG" if name.lower().endswith(".png") else "JPEG"
        Image.fromarray(crop).save(buffer, format=kind, **({"quality": 97} if kind == "JPEG" else {}))
        members.append((f"eval/portraits/{name}", buffer.getvalue()))
    rate = 16000
    waveform, _ = load_audio(ev["audio"], target_sr=rate)  # (samples, duration in seconds)
    members.append(("eval/speech.wav", encode_wav(waveform[: int(ev["seconds"] * rate)], rate)))
    return members


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", required=True, help="NAME=FOLDER of clip shards (repeatable)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=128, help="the model's frame size")
    parser.add_argument("--max-mb", type=float, default=30.0)
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    archive, tmp = args.out / "data.tar.xz", args.out / "data.tar.xz.tmp"
    with tarfile.open(tmp, "w:xz", preset=9) as tar:
        for item in args.data:
            name, _, folder = item.partition("=")
            for path in sorted(Path(folder).iterdir()):
                if path.suffix in (".tar", ".parquet"):  # shards and the manifest (no reports or logs)
                    tar.add(path, arcname=f"{name}/{path.name}")
        for name, data in eval_members(args.size):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    megabytes = tmp.stat().st_size / 1e6
    if megabytes > args.max_mb:
        tmp.unlink()
        raise SystemExit(f"error: the archive is {megabytes:.1f} MB, over --max-mb {args.max_mb}")
    os.replace(tmp, archive)
    shutil.copyfile(HERE / "tiny_run.sh", args.out / "run.sh")
    (args.out / "run.sh").chmod(0o755)
    print(f"{archive}: {megabytes:.1f} MB; {args.out / 'run.sh'}")


if __name__ == "__main__":
    main()
