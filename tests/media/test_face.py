"""Face detection and the reference crop on the shared real portraits and talking-head clips."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from _util import MEDIA
from flashhead.errors import NoFaceError
from flashhead.media.face import (
    FaceBox,
    choose_face,
    crop_box,
    crop_portrait,
    default_detector,
    detect_faces,
    prepare_portrait,
)
from flashhead.media.image import load_image, resize_and_center_crop

pytest.importorskip("mediapipe")

PORTRAITS = sorted((MEDIA / "portraits").glob("*.*"))
FACES = [p for p in PORTRAITS if not p.name.startswith("noface_")]
NO_FACES = [p for p in PORTRAITS if p.name.startswith("noface_")]
CLIPS = sorted((MEDIA / "video").glob("*.mp4"))


def test_media_is_there():
    assert len(FACES) >= 19 and len(NO_FACES) == 2 and len(CLIPS) >= 6


# --- the crop rule ---------------------------------------------------------------------------------------------


def test_crop_box_is_the_official_rule_when_it_fits():
    # Face 100 px wide centred at (150, 150): S = 200, x 150 +- 100, y from 150 - 110 to 150 + 90.
    face = FaceBox(100, 100, 200, 200, 0.9)
    assert crop_box(face, 1000, 1000) == (50, 40, 250, 240)
    assert crop_box(face, 1000, 1000, face_ratio=3.0) == (0, 0, 300, 300)  # shifted in from the corner


def test_crop_box_stays_square_near_borders():
    # Official would clip to (0, 0, 110, 130) and stretch it; we keep 200 x 200 and shift it inside.
    face = FaceBox(-40, 20, 60, 120, 0.9)
    assert crop_box(face, 640, 480) == (0, 0, 200, 200)
    # Bottom-right corner.
    assert crop_box(FaceBox(560, 400, 640, 480, 0.9), 640, 480) == (480, 320, 640, 480)
    # An image narrower than S: the square shrinks to the shorter side.
    assert crop_box(FaceBox(10, 20, 100, 110, 0.9), 112, 150) == (0, 3, 112, 115)
    assert crop_box(FaceBox(10, 20, 100, 110, 0.9), 150, 112) == (0, 0, 112, 112)


def test_choose_face_takes_the_largest_confident_face():
    group = [FaceBox(0, 0, 98, 98, 0.81), FaceBox(300, 0, 423, 123, 0.59), FaceBox(600, 0, 700, 100, 0.80)]
    assert choose_face(group) is group[1]
    real, false_alarm = FaceBox(300, 60, 432, 192, 0.97), FaceBox(433, 122, 600, 289, 0.50)
    assert choose_face([false_alarm, real]) is real  # larger, but far less confident


# --- every shared portrait -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", FACES, ids=lambda p: p.name)
def test_face_found_and_cropped_in_every_portrait(path):
    image = load_image(path)
    faces = detect_faces(image)
    assert faces, f"no face in {path.name}"
    assert [f.area for f in faces] == sorted((f.area for f in faces), reverse=True)
    face = faces[0]
    assert 0.5 <= face.score <= 1.0
    assert 0 < face.width < image.width * 1.05

    cropped, chosen, count = crop_portrait(path, size=512)
    assert cropped.size == (512, 512) and cropped.mode == "RGB"
    assert chosen == face and count == len(faces)

    # The face lies where the rule puts it: mapped into the crop, the detected box ...
    x1, y1, x2, _ = crop_box(face, image.width, image.height)
    expected = face.moved(512 / (x2 - x1), -x1 * 512 / (x2 - x1), -y1 * 512 / (x2 - x1))
    if (x2 - x1) >= 1.99 * face.width:  # the rule's square fitted: width S/2, centred horizontally
        assert expected.width == pytest.approx(256, rel=0.02)
    assert expected.width >= 250
    # ... and detecting again in the crop finds that same face.
    again = detect_faces(cropped)
    assert again, f"no face in the crop of {path.name}"
    assert max(f.iou(expected) for f in again) > 0.5
    best = max(again, key=lambda f: f.iou(expected))
    assert abs(best.center[0] - expected.center[0]) < 0.1 * 512


def test_faces_centred_in_crops_that_fit():
    # Portraits whose crop square lies inside the image: the face is centred horizontally, 5% below centre.
    for name in ["astronaut_woman_512.png", "painting_mona_lisa.png", "man_suit_large_1434x2333.jpg"]:
        cropped, face, _ = crop_portrait(MEDIA / "portraits" / name)
        (found,) = detect_faces(cropped)
        cx, cy = found.center
        assert abs(cx - 256) < 30 and abs(cy - 0.55 * 512) < 40, name
        assert found.width == pytest.approx(256, rel=0.2), name


@pytest.mark.parametrize("path", NO_FACES, ids=lambda p: p.name)
def test_no_face_images_are_rejected(path):
    assert detect_faces(path) == []
    with pytest.raises(NoFaceError) as info:
        crop_portrait(path)
    assert path.name in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(NoFaceError, match=path.name):
        prepare_portrait(path)
    assert prepare_portrait(path, crop=False).shape == (512, 512, 3)  # uncropped still works


def test_group_photo_takes_the_largest_face():
    path = MEDIA / "portraits" / "multi_face_group.jpg"
    faces = detect_faces(path)
    assert len(faces) >= 3
    _, chosen, count = crop_portrait(path)
    assert count == len(faces)
    assert chosen.width == max(f.width for f in faces)


def test_small_faces_in_large_images():
    # The footballer's face is ~30 px in a 548 x 342 wide shot; the large photo is 1434 x 2333.
    (face,) = detect_faces(MEDIA / "portraits" / "small_face_wide_shot.jpg")
    assert 20 < face.width < 45
    (face,) = detect_faces(MEDIA / "portraits" / "man_suit_large_1434x2333.jpg")
    assert 250 < face.width < 360


def test_zoom_search_finds_a_tiny_face_in_a_big_picture():
    # A 45-px face pasted into a 2560-px landscape: too small for a whole-image pass, found by zooming in.
    background = load_image(MEDIA / "portraits" / "noface_landscape.jpg").resize((2560, 1708), Image.BICUBIC)
    portrait = load_image(MEDIA / "portraits" / "astronaut_woman_512.png").resize((224, 224), Image.BICUBIC)
    background.paste(portrait, (900, 600))
    (face,) = detect_faces(background)
    assert face.x1 > 900 and face.y1 > 600 and face.x2 < 1124 and face.y2 < 824
    assert 35 < face.width < 60


# --- prepare_portrait --------------------------------------------------------------------------------------------


def test_prepare_portrait():
    path = MEDIA / "portraits" / "pexels_baby_laughing.jpg"
    out = prepare_portrait(path)
    assert out.shape == (512, 512, 3) and out.dtype == np.uint8
    assert np.array_equal(out, np.asarray(crop_portrait(path)[0]))
    uncropped = prepare_portrait(path, crop=False, size=(480, 832))
    assert np.array_equal(uncropped, resize_and_center_crop(load_image(path), (480, 832)))
    assert prepare_portrait(load_image(path), size=(480, 832)).shape == (480, 832, 3)


# --- video frames -----------------------------------------------------------------------------------------------


def sample_frames(path, count: int = 3, stride: int = 20) -> list[np.ndarray]:
    av = pytest.importorskip("av")
    frames = []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i % stride == 0:
                frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == count:
                break
    return frames


@pytest.mark.parametrize("path", CLIPS, ids=lambda p: p.name)
def test_faces_found_in_video_frames(path):
    frames = sample_frames(path)
    assert len(frames) == 3
    detector = default_detector()
    for frame in frames:
        faces = detector.detect(frame)
        assert faces, f"no face in a frame of {path.name}"
        height, width = frame.shape[:2]
        face = faces[0]
        assert face.score >= 0.5
        assert 0.1 * width < face.width < 0.8 * width
        assert 0 < face.center[0] < width and 0 < face.center[1] < height


def test_mediapipe_notices_are_kept_off_stderr_and_other_lines_kept():
    # A fresh process: MediaPipe prints its TFLite / absl notices the first time a graph is built and run.
    code = (
        "import os\n"
        "from flashhead.media.face import FaceDetector, _native_notices_dropped\n"
        "FaceDetector().close()\n"
        "with _native_notices_dropped():\n"
        "    os.write(2, b'W0000 inference_feedback_manager.cc:114] notice\\nnative trouble\\n')\n"
        "try:\n"
        "    with _native_notices_dropped():\n"
        "        os.write(2, b'why it failed\\n')\n"
        "        raise RuntimeError\n"
        "except RuntimeError:\n"
        "    pass\n"
        "import threading\n"  # two detectors built at once: fd 2 must end where it began
        "threads = [threading.Thread(target=lambda: FaceDetector().close()) for _ in range(2)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "os.write(2, b'after\\n')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "inference_feedback_manager" not in done.stderr
    assert "XNNPACK" not in done.stderr and "absl::InitializeLog" not in done.stderr
    assert done.stderr.strip().splitlines() == ["native trouble", "why it failed", "after"]
