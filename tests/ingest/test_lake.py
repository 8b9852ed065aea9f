"""objret.ingest.lake: real bench images and a real video made from bench frames, ingested into a manifest."""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import shutil
import sqlite3
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile

from objret.ingest import lake as lake_module
from objret import storage
from objret.errors import BadFrameError, ObjretError, StoreError
from objret.ingest.frame_table import FrameTable
from objret.ingest.lake import Lake
from tests.helpers.sigkill import run_killed, sigkill_at_call
from objret.ingest.decode import load_image

VIDEO_FRAMES = 20
VIDEO_FPS = 10.0


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def bench_images(bench_dir) -> list[Path]:
    images = sorted((bench_dir / "tud_campus" / "images").glob("*.jpg"))
    assert len(images) >= VIDEO_FRAMES, f"tud_campus frames missing under {bench_dir}"
    return images


@pytest.fixture
def image_folder(tmp_path, bench_images) -> Path:
    """Six real images: nested, an upper-case extension, a PNG, and a file that is no image."""
    folder = tmp_path / "lake_src"
    (folder / "sub").mkdir(parents=True)
    for image in bench_images[:3]:
        shutil.copy(image, folder / image.name)
    shutil.copy(bench_images[3], folder / "sub" / "CAPS.JPG")
    shutil.copy(bench_images[4], folder / "sub" / bench_images[4].name)
    Image.open(bench_images[5]).save(folder / "sub" / "frame.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def video(tmp_path_factory, bench_images) -> Path:
    """A real 20-frame MJPG video at 10 fps made of consecutive bench frames."""
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), VIDEO_FPS, (640, 480))
    for image in bench_images[:VIDEO_FRAMES]:
        writer.write(cv2.imread(str(image)))
    writer.release()
    return path


@pytest.fixture(scope="module")
def video_ids(tmp_path_factory, video) -> list[str]:
    """The ids of every frame of the video, from a clean ingest."""
    lake = Lake(tmp_path_factory.mktemp("clean_video_lake"))
    assert lake.ingest(str(video), every_n=1, progress=False).added == VIDEO_FRAMES
    return [frame.frame_id for frame in lake.frames()]


# ---- image folders ------------------------------------------------------------------------------------


def test_folder_ingest_records_content_ids_and_sizes(tmp_path, image_folder):
    lake = Lake(tmp_path / "lake")
    result = lake.ingest(str(image_folder), every_n=1, progress=False)

    expected = sorted(str(p) for p in image_folder.rglob("*") if p.suffix.lower() in {".jpg", ".png"})
    assert (result.added, result.skipped, result.errors) == (6, 0, [])
    frames = lake.frames()
    assert [f.uri for f in frames] == expected  # notes.txt left out; order kept
    for frame in frames:
        with Image.open(frame.uri) as image:
            assert (frame.width, frame.height) == image.size == (640, 480)
        assert frame.frame_id == sha256_of(frame.uri)
        assert frame.image_uri == frame.uri
        assert frame.source == str(image_folder)
        assert (frame.frame_index, frame.time_s) == (None, None)
        assert lake.get(frame.frame_id) == frame
    assert len(lake) == 6
    with sqlite3.connect(tmp_path / "lake" / "manifest.sqlite") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert [seq for (seq,) in conn.execute("SELECT seq FROM frames ORDER BY seq")] == list(range(1, 7))
    assert load_image(frames[0].uri).shape == (480, 640, 3)


def test_reingest_adds_nothing_and_new_files_add_themselves(tmp_path, image_folder, bench_images):
    lake = Lake(tmp_path / "lake")
    lake.ingest(str(image_folder), every_n=1, progress=False)
    version = lake.version()

    again = Lake(tmp_path / "lake").ingest(str(image_folder), every_n=1, progress=False)  # a new process, same root
    assert (again.added, again.skipped, again.errors) == (0, 6, [])
    assert lake.version() == version

    shutil.copy(bench_images[10], image_folder / "new.jpg")
    shutil.copy(bench_images[0], image_folder / "sub" / "same_pixels_other_name.jpg")
    result = lake.ingest(str(image_folder), every_n=1, progress=False)
    assert (result.added, result.skipped) == (1, 7)  # the copy is already present under its first name
    assert len(lake) == 7
    assert lake.frames()[-1].uri == str(image_folder / "new.jpg")
    assert lake.version() != version
    copy = lake.find(str(image_folder / "sub" / "same_pixels_other_name.jpg"))
    assert copy.frame_id == sha256_of(bench_images[0])


def test_corrupt_and_empty_images_are_reported_and_skipped(tmp_path, image_folder, bench_images):
    data = bench_images[7].read_bytes()
    (image_folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    (image_folder / "empty.png").write_bytes(b"")
    lake = Lake(tmp_path / "lake")

    result = lake.ingest(str(image_folder), every_n=1, progress=False)

    assert result.added == 6
    errors = dict(result.errors)
    assert sorted(errors) == [str(image_folder / "cut.jpg"), str(image_folder / "empty.png")]
    assert str(image_folder / "cut.jpg") in errors[str(image_folder / "cut.jpg")]
    assert "truncated" in errors[str(image_folder / "cut.jpg")]
    assert "empty" in errors[str(image_folder / "empty.png")]
    assert lake.find(str(image_folder / "cut.jpg")) is None
    with pytest.raises(BadFrameError, match="cut.jpg"):
        load_image(str(image_folder / "cut.jpg"))


def test_single_image_file_and_bad_sources(tmp_path, image_folder):
    lake = Lake(tmp_path / "lake")
    image = image_folder / "sub" / "frame.png"
    assert lake.ingest(str(image), every_n=1, progress=False).added == 1
    assert lake.frames()[0].source == str(image)

    with pytest.raises(StoreError, match="no_such_folder"):
        lake.ingest(str(tmp_path / "no_such_folder"), every_n=1, progress=False)
    with pytest.raises(ObjretError, match="notes.txt"):
        lake.ingest(str(image_folder / "notes.txt"), every_n=1, progress=False)
    with pytest.raises(ObjretError, match="every_n"):
        lake.ingest(str(image_folder), every_n=0, progress=False)


def test_frame_table_reads_frames_from_the_manifest_as_they_are_ingested(tmp_path, image_folder, bench_images):
    lake = Lake(tmp_path / "lake")
    lake.ingest(str(image_folder), every_n=1, progress=False)
    table = FrameTable(lake)
    frames = lake.frames()
    assert list(table) == [f.frame_id for f in frames] and len(table) == 6
    assert all(table[f.frame_id] == f and f.frame_id in table for f in frames)
    assert "nope" not in table and 3 not in table and table.get("nope") is None
    with pytest.raises(KeyError, match="no frame 'nope'"):
        table["nope"]
    # Frames ingested after the table was made are in it: it holds nothing but a connection.
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(bench_images[-1], extra / "late.jpg")
    lake.ingest(str(extra), every_n=1, progress=False)
    late = lake.find(str(extra / "late.jpg"))
    assert len(table) == 7 and table[late.frame_id] == late
    # A thread of its own reads through a connection of its own (sqlite3 refuses another thread's).
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(table.__getitem__, [f.frame_id for f in frames])) == frames
    copy = pickle.loads(pickle.dumps(table))   # as a Dask worker receives it: the lake, not the connections
    assert copy[late.frame_id] == late and len(copy) == 7


def test_present_keeps_the_ids_still_in_the_lake_in_their_order(tmp_path, image_folder):
    lake = Lake(tmp_path / "lake")
    lake.ingest(str(image_folder), every_n=1, progress=False)
    ids = [f.frame_id for f in lake.frames()]
    asked = [ids[3], "gone-1", ids[0], ids[5], "gone-2", ids[1]]
    assert lake.present(asked, chunk=2) == [ids[3], ids[0], ids[5], ids[1]]   # chunks split the gone ones
    assert lake.present(asked) == lake.present(asked, chunk=2) and lake.present([]) == []


def test_get_unknown_frame_raises_a_key_error(tmp_path):
    with pytest.raises(ObjretError, match="no frame 'nope'") as raised:
        Lake(tmp_path / "lake").get("nope")
    assert isinstance(raised.value, KeyError)


def test_progress_bar_can_be_switched_off(tmp_path, image_folder, capfd):
    Lake(tmp_path / "quiet").ingest(str(image_folder), every_n=1, progress=False)
    assert capfd.readouterr().err == ""
    Lake(tmp_path / "loud").ingest(str(image_folder), every_n=1, progress=True)
    assert "6/6" in capfd.readouterr().err


# ---- videos -------------------------------------------------------------------------------------------


def test_video_every_n_frames_stored_once_as_jpeg(tmp_path, video):
    lake = Lake(tmp_path / "lake")
    result = lake.ingest(str(video), every_n=3, progress=False)

    assert (result.added, result.errors) == (7, [])
    frames = lake.frames()
    assert [f.frame_index for f in frames] == [0, 3, 6, 9, 12, 15, 18]
    assert [f.time_s for f in frames] == pytest.approx([i / VIDEO_FPS for i in range(0, 20, 3)])
    assert [f.uri for f in frames] == [f"{video}#frame={i}" for i in range(0, 20, 3)]
    assert {f.source for f in frames} == {str(video)}

    # The id is the hash of the decoded RGB pixels and their shape.
    capture = cv2.VideoCapture(str(video))
    for _ in range(4):
        ok, bgr = capture.read()
    capture.release()
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    assert frames[1].frame_id == hashlib.sha256(rgb.tobytes() + b"480x640x3").hexdigest()

    stored = sorted((tmp_path / "lake" / "frames").iterdir())
    assert stored == sorted(Path(f.image_uri) for f in frames)
    for frame in frames:
        assert frame.image_uri == str(tmp_path / "lake" / "frames" / f"{frame.frame_id}.jpg")
        assert (frame.width, frame.height) == (640, 480)
    pixels = load_image(frames[1].image_uri)
    assert pixels.shape == (480, 640, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - rgb.astype(int)).mean() < 3  # JPEG quality 95: near-lossless


def test_video_fps_sampling(tmp_path, video):
    lake = Lake(tmp_path / "lake")
    result = lake.ingest(str(video), every_n=1, fps=4.0, progress=False)
    # ticks every 0.25 s on a 10 fps video: the first frame at or after each tick
    assert [f.frame_index for f in lake.frames()] == [0, 3, 5, 8, 10, 13, 15, 18]
    assert [f.time_s for f in lake.frames()] == pytest.approx([0, 0.3, 0.5, 0.8, 1.0, 1.3, 1.5, 1.8])
    assert result.added == 8

    faster_than_video = Lake(tmp_path / "all").ingest(str(video), every_n=1, fps=25.0, progress=False)
    assert faster_than_video.added == VIDEO_FRAMES


def test_video_reingest_skips_and_a_denser_sampling_adds_the_rest(tmp_path, video, video_ids):
    lake = Lake(tmp_path / "lake")
    lake.ingest(str(video), every_n=3, progress=False)
    again = lake.ingest(str(video), every_n=3, progress=False)
    assert (again.added, again.skipped, again.errors) == (0, 7, [])

    denser = lake.ingest(str(video), every_n=1, progress=False)
    assert (denser.added, denser.skipped) == (13, 7)
    assert sorted(f.frame_id for f in lake.frames()) == sorted(video_ids)


def test_truncated_video_keeps_the_frames_before_the_cut(tmp_path, video, video_ids):
    data = video.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    lake = Lake(tmp_path / "lake")

    result = lake.ingest(str(cut), every_n=1, progress=False)

    [(uri, message)] = result.errors
    assert uri == str(cut)
    match = re.fullmatch(rf"{re.escape(str(cut))}: truncated .* after (\d+) of 20 frames.*", message)
    assert match, message
    decoded = int(match.group(1))
    assert 5 <= decoded < VIDEO_FRAMES
    # The last decoded frame may be cut mid-frame, so it is dropped; the others are the video's own.
    assert [f.frame_id for f in lake.frames()] == video_ids[: decoded - 1]
    assert result.added == decoded - 1

    again = lake.ingest(str(cut), every_n=1, progress=False)  # still reported, nothing lost, nothing doubled
    assert (again.added, again.skipped, len(again.errors)) == (0, decoded - 1, 1)
    assert len(lake) == decoded - 1


def test_unreadable_videos_are_reported(tmp_path, video, bench_images):
    mp4 = tmp_path / "clip.mp4"  # index at the end: half an mp4 does not open at all
    writer = cv2.VideoWriter(str(mp4), cv2.VideoWriter_fourcc(*"mp4v"), VIDEO_FPS, (640, 480))
    for image in bench_images[:5]:
        writer.write(cv2.imread(str(image)))
    writer.release()
    mp4.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 2])
    not_a_video = tmp_path / "notes.avi"
    not_a_video.write_text("not a video")
    lake = Lake(tmp_path / "lake")

    for bad in (mp4, not_a_video):
        result = lake.ingest(str(bad), every_n=1, progress=False)
        assert result.added == 0
        assert result.errors == [(str(bad), f"{bad}: cannot open video")]
    assert len(lake) == 0


def test_find_by_exact_uri_video_index_and_relative_name(tmp_path, image_folder, video, bench_images):
    lake = Lake(tmp_path / "lake")
    lake.ingest(str(image_folder), every_n=1, progress=False)
    lake.ingest(str(video), every_n=2, progress=False)

    by_index = lake.find(str(video), 4)
    assert (by_index.frame_index, by_index.uri) == (4, f"{video}#frame=4")
    assert lake.find("clip.avi", 4) == by_index
    assert lake.find("clip.avi", 5) is None  # not sampled
    assert lake.find(f"{video}#frame=4") == by_index

    name = bench_images[0].name
    assert lake.find(name).uri == str(image_folder / name)
    assert lake.find(f"sub/{bench_images[4].name}").uri == str(image_folder / "sub" / bench_images[4].name)
    assert lake.find(str(image_folder / "sub" / "CAPS.JPG")).frame_id == sha256_of(bench_images[3])
    assert lake.find(name[2:]) is None  # matches whole path components only
    assert lake.find("missing.jpg") is None

    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(bench_images[12], other / name)  # same file name, other pixels
    lake.ingest(str(other), every_n=1, progress=False)
    with pytest.raises(ObjretError, match="ambiguous"):
        lake.find(name)
    assert lake.find(f"other/{name}").frame_id == sha256_of(bench_images[12])


# ---- a killed ingestion resumes -----------------------------------------------------------------------


# The ingests are SIGKILLed in a forked child (tests/helpers/sigkill.py): no `with conn` rolls back, no connection is
# closed, nothing is cleaned up; what the next run finds is what SQLite's WAL kept.

def test_killed_folder_ingest_resumes_to_a_clean_runs_manifest(tmp_path, image_folder):
    clean = Lake(tmp_path / "clean")
    clean.ingest(str(image_folder), every_n=1, progress=False)

    lake = Lake(tmp_path / "lake")

    def run():   # killed as it reads the 6th image: two batches of 2 committed, the third half-built
        lake_module.BATCH_SIZE = 2
        sigkill_at_call(lake_module, "_image_frame", 6)
        lake.ingest(str(image_folder), every_n=1, progress=False)

    run_killed(run)
    assert len(lake) == 4  # two committed batches survive; the half-built third is gone

    result = lake.ingest(str(image_folder), every_n=1, progress=False)
    assert (result.added, result.skipped) == (2, 4)
    assert lake.frames() == clean.frames()
    assert lake.version() == clean.version()


def test_killed_video_ingest_resumes_to_a_clean_runs_manifest(tmp_path, video, video_ids):
    lake = Lake(tmp_path / "lake")

    def run():   # killed as it stores the 8th frame: two batches of 3 committed
        lake_module.BATCH_SIZE = 3
        sigkill_at_call(Lake, "_store_video_frame", 8)
        lake.ingest(str(video), every_n=1, progress=False)

    run_killed(run)
    assert len(lake) == 6
    with sqlite3.connect(tmp_path / "lake" / "manifest.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM sources").fetchone()[0] == 0  # not complete

    result = lake.ingest(str(video), every_n=1, progress=False)
    assert (result.added, result.skipped, result.errors) == (14, 6, [])
    assert [f.frame_id for f in lake.frames()] == video_ids
    assert [f.frame_index for f in lake.frames()] == list(range(VIDEO_FRAMES))
    assert lake.ingest(str(video), every_n=1, progress=False).skipped == VIDEO_FRAMES


# ---- S3 (a real SeaweedFS on loopback) -----------------------------------------------------------------


@pytest.fixture
def s3_images(s3_store, bench_images) -> str:
    """Four bench images, a non-image and a video under s3://objret-lake/cams/, returned as the prefix."""
    client = s3_store.client()
    client.create_bucket(Bucket="objret-lake")
    for image in bench_images[:3]:
        client.upload_file(str(image), "objret-lake", f"cams/a/{image.name}")
    client.upload_file(str(bench_images[3]), "objret-lake", "cams/b/LAST.JPG")
    client.put_object(Bucket="objret-lake", Key="cams/readme.txt", Body=b"not an image")
    client.put_object(Bucket="objret-lake", Key="cams/clip.mp4", Body=b"a video")
    client.upload_file(str(bench_images[9]), "objret-lake", "elsewhere/other.jpg")
    yield "s3://objret-lake/cams"
    for obj in client.list_objects_v2(Bucket="objret-lake").get("Contents", []):
        client.delete_object(Bucket="objret-lake", Key=obj["Key"])
    client.delete_bucket(Bucket="objret-lake")


def test_s3_prefix_ingest_matches_local_ids(tmp_path, s3_images, bench_images):
    lake = Lake(tmp_path / "lake")
    result = lake.ingest(s3_images, every_n=1, progress=False)

    assert result.added == 4
    [(uri, message)] = result.errors
    assert uri == "s3://objret-lake/cams/clip.mp4"
    assert message.startswith(f"{uri}: videos on S3 are not supported yet")
    frames = lake.frames()
    assert [f.uri for f in frames] == [f"s3://objret-lake/cams/a/{p.name}" for p in bench_images[:3]] + [
        "s3://objret-lake/cams/b/LAST.JPG"]
    assert [f.frame_id for f in frames] == [sha256_of(p) for p in bench_images[:4]]
    assert all(f.image_uri == f.uri and f.source == s3_images for f in frames)
    assert all((f.width, f.height) == (640, 480) for f in frames)
    assert np.array_equal(load_image(frames[0].uri), np.asarray(Image.open(bench_images[0]).convert("RGB")))
    assert lake.find("b/LAST.JPG") == frames[3]

    again = lake.ingest(s3_images + "/", every_n=1, progress=False)
    assert (again.added, again.skipped) == (0, 4)
    one_video = lake.ingest("s3://objret-lake/cams/clip.mp4", every_n=1, progress=False)
    assert (one_video.added, [u for u, _ in one_video.errors]) == (0, ["s3://objret-lake/cams/clip.mp4"])

    local = Lake(tmp_path / "local")
    local.ingest(str(bench_images[0]), every_n=1, progress=False)
    assert local.frames()[0].frame_id == frames[0].frame_id


def test_s3_endpoint_given_as_argument(tmp_path, s3_images, s3_store, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    storage.s3_client.cache_clear()
    lake = Lake(tmp_path / "lake")
    assert lake.ingest(s3_images, every_n=1, endpoint_url=s3_store.endpoint_url, progress=False).added == 4
    assert lake.ingest("s3://objret-lake/elsewhere/other.jpg", every_n=1, endpoint_url=s3_store.endpoint_url,
                       progress=False).added == 1


def test_s3_wrong_credentials_raise_a_store_error(tmp_path, s3_images, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    storage.s3_client.cache_clear()
    lake = Lake(tmp_path / "lake")
    with pytest.raises(StoreError, match=r"cannot list s3://objret-lake/cams: .*SignatureDoesNotMatch"):
        lake.ingest(s3_images, every_n=1, progress=False)
    assert len(lake) == 0


def test_s3_missing_prefix_raises_a_store_error(tmp_path, s3_images):
    with pytest.raises(StoreError, match="nothing under s3://objret-lake/no_such_prefix"):
        Lake(tmp_path / "lake").ingest("s3://objret-lake/no_such_prefix", every_n=1, progress=False)


def test_s3_unreachable_endpoint_raises_a_store_error(tmp_path, monkeypatch):
    import boto3
    from botocore.config import Config

    # The real client retries a refused connection for ~20 s; one attempt shows the same error path.
    def one_attempt_client(endpoint_url=None):
        return boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1",
                            aws_access_key_id="key", aws_secret_access_key="secret",
                            config=Config(retries={"max_attempts": 1}, connect_timeout=2))

    monkeypatch.setattr(storage, "s3_client", one_attempt_client)
    closed_port = _closed_port()
    lake = Lake(tmp_path / "lake")
    with pytest.raises(StoreError, match=f"cannot list s3://bucket/prefix: .*127.0.0.1:{closed_port}"):
        lake.ingest("s3://bucket/prefix", every_n=1, endpoint_url=f"http://127.0.0.1:{closed_port}", progress=False)
    assert len(lake) == 0


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:  # a free port nobody listens on: connections are refused
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- bad input in a lake folder ------------------------------------------------------------------------


def write_bad_files(folder: Path, bench_images: list[Path], video: Path) -> dict[str, str]:
    """Every kind of bad file a lake folder may hold, each named after what is wrong with it; returns
    {file name: what its error message must say}."""
    jpeg = bench_images[7].read_bytes()
    png = io.BytesIO()
    Image.open(bench_images[8]).save(png, "PNG")
    png = png.getvalue()
    broken_png = bytearray(png)
    start = png.find(b"IDAT") + 100
    broken_png[start:start + 100] = bytes(b ^ 0xFF for b in broken_png[start:start + 100])  # damaged pixel data
    (folder / "corrupt.jpg").write_bytes(jpeg[:200] + bytes(range(256)) * 40)  # header, then garbage
    (folder / "corrupt.png").write_bytes(bytes(broken_png))
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "cut.png").write_bytes(png[: len(png) // 2])
    (folder / "not_an_image.jpg").write_bytes(b"GIF? no: plain text with an image extension")
    Image.new("RGB", (1, 1), (200, 30, 30)).save(folder / "tiny_1x1.png")
    # 20000 x 20000 of one colour: a 260 kB file, 1.2 GB as RGB pixels. Mode "1" keeps its creation at 50 MB.
    Image.new("1", (20000, 20000), 1).save(folder / "huge_20000x20000.png", compress_level=1)
    data = video.read_bytes()
    (folder / "cut.avi").write_bytes(data[: len(data) // 2])
    return {"corrupt.jpg": "cannot decode image", "corrupt.png": "cannot decode image", "zero.jpg": "empty file",
            "cut.jpg": "truncated", "cut.png": "truncated", "not_an_image.jpg": "not in an image format",
            "tiny_1x1.png": "image too small: 1x1", "huge_20000x20000.png": "image too large, not decoded",
            "cut.avi": "truncated video"}


def test_bad_files_in_a_lake_folder_are_reported_and_skipped_the_rest_ingested(tmp_path, image_folder,
                                                                               bench_images, video, video_ids,
                                                                               monkeypatch):
    lake = Lake(tmp_path / "lake")
    assert lake.ingest(str(image_folder), every_n=1, progress=False).added == 6
    before = lake.frames()
    expected = write_bad_files(image_folder, bench_images, video)
    decoded = []   # sizes of the images whose pixels were decoded
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: (decoded.append(self.size), real_load(self))[1])

    result = lake.ingest(str(image_folder), every_n=1, progress=False)

    errors = dict(result.errors)
    assert sorted(errors) == sorted(str(image_folder / name) for name in expected)
    for name, says in expected.items():   # each by name, with what is wrong
        message = errors[str(image_folder / name)]
        assert message.startswith(f"{image_folder / name}: ") and says in message, message
    assert (20000, 20000) not in decoded and (640, 480) in decoded   # refused from its header, never decoded
    # The good images stay, the video keeps the frames before its cut (but the last, maybe incomplete).
    cut_frames = int(re.search(r"after (\d+) of", errors[str(image_folder / "cut.avi")]).group(1)) - 1
    assert cut_frames >= 4 and result.added == cut_frames and result.skipped == 6
    assert lake.frames()[:6] == before
    assert [f.frame_id for f in lake.frames()[6:]] == video_ids[:cut_frames]
    assert {f.source for f in lake.frames()[6:]} == {str(image_folder / "cut.avi")}

    again = lake.ingest(str(image_folder), every_n=1, progress=False)   # reported again, nothing lost or doubled
    assert (again.added, again.skipped, sorted(dict(again.errors))) == (0, 6 + cut_frames, sorted(errors))
    assert len(lake) == 6 + cut_frames
    print(f"\nbad-input lake folder: {len(errors)} bad files reported and skipped, {6 + cut_frames} frames ingested "
          f"(6 images + {cut_frames} frames of the truncated video)")


def test_image_size_limits_come_from_params(tmp_path, image_folder):
    from objret.steps import ingest as ingest_step
    from objret.config import load_params
    from objret.steps.workspace import Workspace

    assert lake_module.MAX_PIXELS == 100_000_000 and lake_module.MIN_SIDE == 32
    ws = Workspace(load_params(None, ["lake.max_pixels=307199", "lake.min_side=100"]), tmp_path / "work")
    [result] = ingest_step.ingest(ws, [str(image_folder)], progress=False)
    assert result.added == 0 and len(result.errors) == 6   # 640 x 480 = 307200 pixels each
    assert all("more than lake.max_pixels (307199)" in message for _, message in result.errors)
    ws = Workspace(load_params(None, ["lake.min_side=481"]), tmp_path / "work2")
    [result] = ingest_step.ingest(ws, [str(image_folder)], progress=False)
    assert result.added == 0 and all("640x480, a side under lake.min_side (481 px)" in m for _, m in result.errors)
    with pytest.raises(BadFrameError, match="more than lake.max_pixels"):
        load_image(str(next(image_folder.glob("*.jpg"))), max_pixels=1000)
