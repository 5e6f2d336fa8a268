"""Shard format, manifest, random-access reader and writer.

A shard directory holds:

* ``shard-NNNNN.tar``: a WebDataset tar; each sample is two consecutive members ``KEY.jpg`` (an RGB
  JPEG) and its annotation: ``KEY.cls`` (the class id as ASCII digits) in a classification shard,
  ``KEY.png`` (label map) in a segmentation shard, ``KEY.json`` (instances) in a detection shard
  (``Manifest.kind``; formats in ``itpn_ds.data.annotations``).
* ``shard-NNNNN.idx``: its DALI index (the ``wds2idx`` format ``fn.readers.webdataset`` reads):
  a first line ``v1.2 N`` then one line per sample ``jpg OFFSET SIZE KEY.jpg cls OFFSET SIZE KEY.cls``
  (``png``/``json`` in place of ``cls`` for the dense kinds; OFFSET = byte offset of the member's data
  in the tar).
* ``manifest.json``: :class:`Manifest`.
* ``shard-NNNNN.meta.json``: per-shard record of a finished shard (lets an interrupted run resume).
* ``bad_files.tsv``: inputs that could not become samples, with the reason.

Keys are the source paths relative to the input root without extension, with every character outside
``[A-Za-z0-9_/-]`` replaced by ``_`` (a dot would end the WebDataset key).
"""
from __future__ import annotations

import bisect
import hashlib
import io
import itertools
import json
import os
import re
import sys
import tarfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator, Sequence

from itpn_ds import __version__
from itpn_ds.data.annotations import (ANNOTATION_EXT, CLASSIFICATION, DETECTION, IGNORE_INDEX, SEGMENTATION,
                                      BadAnnotation, DenseSpec, check_instances, check_label_map)
from itpn_ds.data.preprocess import BadImage, PreprocessOptions, prepare_image
from itpn_ds.errors import UserError

MANIFEST_NAME = "manifest.json"
BAD_REPORT_NAME = "bad_files.tsv"
FORMAT_VERSION = 1
INDEX_VERSION = "v1.2"
TAR_BLOCK = 512
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_/-]")


class ShardError(UserError, RuntimeError):
    """A shard directory that cannot be read as written: names the file and what is wrong."""


class SampleChecksumError(ShardError):
    """One sample whose bytes are not those written (damaged, or an index that does not match its tar)."""


@dataclass(frozen=True)
class SourceItem:
    """One input image: its file, its sample key and its class id (classification; 0 for the dense
    kinds). ``annotation``: segmentation: the label map's path; detection: the image's instance record
    as JSON text (``itpn_ds.data.annotations``)."""

    path: str
    key: str
    label: int
    annotation: str = ""


@dataclass
class ShardInfo:
    """One finished shard. ``sha256`` and ``bytes`` are of the tar file."""

    tar: str
    index: str
    num_samples: int
    sha256: str
    bytes: int


@dataclass
class Manifest:
    """Everything about a shard directory. Per-sample lists are in shard order (shard 0's samples first,
    in tar order); ``sizes`` are (width, height) in px after preprocessing.

    ``kind``: ``classification`` (``labels`` holds each sample's class id), ``segmentation`` or
    ``detection`` (``labels`` is empty: the annotations are in the shards). ``crc32`` holds each sample's
    [JPEG, annotation] member CRC32s, checked on every read (empty in manifests written before it: unchecked). For the dense kinds
    ``classes`` maps class names to training ids (segmentation 0..K-1, detection 1..K),
    ``ignore_index`` is the label-map value of ignored pixels, ``reduce_zero_label`` says that raw label
    0 is ignored and raw v is class v - 1 (ADE20K), ``category_ids`` the annotation file's category id
    of each detection label 1..K.
    """

    shards: list[ShardInfo]
    keys: list[str]
    labels: list[int]
    sizes: list[tuple[int, int]]
    classes: dict[str, int]
    source: str
    options: dict
    num_bad: int = 0
    bad_report: str = BAD_REPORT_NAME
    tool_version: str = __version__
    format_version: int = FORMAT_VERSION
    kind: str = CLASSIFICATION
    ignore_index: int = IGNORE_INDEX
    reduce_zero_label: bool = False
    category_ids: list[int] = field(default_factory=list)
    crc32: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def annotation_ext(self) -> str:
        """The member next to each ``KEY.jpg``: ``cls``, ``png`` or ``json``."""
        return ANNOTATION_EXT[self.kind]

    def dense_spec(self) -> DenseSpec:
        """What this (segmentation or detection) shard's annotations satisfy."""
        return DenseSpec(self.kind, self.num_classes, self.reduce_zero_label, self.ignore_index,
                         tuple(self.category_ids))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        _atomic_write_text(path, json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "Manifest":
        """Load ``directory/manifest.json`` (or the file itself when given a path to it)."""
        path = Path(directory)
        path = path if path.suffix == ".json" else path / MANIFEST_NAME
        if not path.is_file():
            raise ShardError(f"{path}: manifest not found (is this an `itpn-ds make-shards` output directory?)")
        try:
            raw = json.loads(path.read_text())
            raw["shards"] = [ShardInfo(**s) for s in raw["shards"]]
            raw["sizes"] = [tuple(s) for s in raw["sizes"]]
            manifest = cls(**raw)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ShardError(f"{path}: not a valid manifest: {exc}") from exc
        manifest.check_consistent(path)
        return manifest

    def check_consistent(self, where: str | Path) -> None:
        """The per-sample lists agree with each other, the shard counts and the class map."""
        n = len(self.keys)
        if self.crc32 and len(self.crc32) != n:
            raise ShardError(f"{where}: {len(self.crc32)} checksums for {n} samples")
        if self.kind not in ANNOTATION_EXT:
            raise ShardError(f"{where}: unknown shard kind {self.kind!r} (one of {sorted(ANNOTATION_EXT)})")
        if self.kind != CLASSIFICATION:
            if self.labels or len(self.sizes) != n or n != sum(s.num_samples for s in self.shards):
                raise ShardError(f"{where}: {n} keys, {len(self.sizes)} sizes and "
                                 f"{sum(s.num_samples for s in self.shards)} samples in the shards disagree "
                                 f"(a {self.kind} manifest lists no per-sample labels)")
            return
        if not (len(self.labels) == len(self.sizes) == n == sum(s.num_samples for s in self.shards)):
            raise ShardError(f"{where}: {n} keys, {len(self.labels)} labels, {len(self.sizes)} sizes and "
                             f"{sum(s.num_samples for s in self.shards)} samples in the shards disagree")
        ids = set(self.classes.values())
        for key, label in zip(self.keys, self.labels):
            if label not in ids:
                raise ShardError(f"{where}: sample {key!r} has label {label}, outside the class map "
                                 f"({len(self.classes)} classes)")


# ----------------------------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class SampleLocation:
    """Where a sample's JPEG bytes lie: shard number, byte offset and size in its tar."""

    shard: int
    offset: int
    size: int


@dataclass(frozen=True)
class Sample:
    key: str
    data: bytes
    label: int
    size: tuple[int, int]


@dataclass(frozen=True)
class ShardLayout:
    """What a plan needs of a shard set: its images, shard files and their bytes (tar files)."""

    images: int
    shards: int
    bytes: int

    @property
    def bytes_per_image(self) -> float:
        return self.bytes / max(self.images, 1)

    @classmethod
    def of(cls, directory: str | Path) -> "ShardLayout":
        """The layout ``directory``'s manifest records (``ShardError`` naming it when there is none)."""
        manifest = Manifest.load(directory)
        return cls(len(manifest), len(manifest.shards), sum(s.bytes for s in manifest.shards))


def read_index(path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Parse a DALI webdataset index: [(key, {ext: (offset, size)})] in tar order."""
    if not path.is_file():
        raise ShardError(f"{path}: index file missing")
    lines = path.read_text().splitlines()
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] != INDEX_VERSION or not header[1].isdigit():
        raise ShardError(f"{path}: bad index header {lines[0] if lines else ''!r}, expected '{INDEX_VERSION} N'")
    entries = []
    for number, line in enumerate(lines[1:], start=2):
        fields_ = line.split()
        if not fields_ or len(fields_) % 4:
            raise ShardError(f"{path}:{number}: malformed index line {line!r}")
        components = {}
        key = None
        for ext, offset, size, name in zip(*[iter(fields_)] * 4):
            key = name[: -len(ext) - 1]
            components[ext] = (int(offset), int(size))
        entries.append((key, components))
    if len(entries) != int(header[1]):
        raise ShardError(f"{path}: header says {header[1]} samples, {len(entries)} lines follow")
    return entries


class ShardReader:
    """Random access to the samples of a shard directory by index or key.

    Reads each sample's JPEG with one ``pread`` at the offset the index gives. File handles are opened
    lazily per process, so a reader may be shared with forked workers.
    """

    def __init__(self, directory: str | Path, manifest: Manifest | None = None) -> None:
        self.directory = Path(directory)
        self.manifest = manifest or Manifest.load(self.directory)
        self.annotation_locations: list[SampleLocation] = []
        self.locations = self._locate()
        self._position = {key: i for i, key in enumerate(self.manifest.keys)}
        self._files: dict[int, int] = {}
        self._pid = os.getpid()

    def _locate(self) -> list[SampleLocation]:
        locations = []
        ext = self.manifest.annotation_ext
        for shard_number, shard in enumerate(self.manifest.shards):
            tar_path = self.directory / shard.tar
            if not tar_path.is_file():
                raise ShardError(f"{tar_path}: shard listed in the manifest is missing")
            entries = read_index(self.directory / shard.index)
            if len(entries) != shard.num_samples:
                raise ShardError(f"{self.directory / shard.index}: {len(entries)} samples, the manifest says "
                                 f"{shard.num_samples}")
            tar_size = tar_path.stat().st_size
            first = len(locations)
            for i, (key, components) in enumerate(entries):
                expected = self.manifest.keys[first + i]
                if key != expected or "jpg" not in components or ext not in components:
                    raise ShardError(f"{self.directory / shard.index}: entry {i} is {key!r} "
                                     f"({sorted(components)}), the manifest expects {expected!r} with a jpg "
                                     f"and a {ext}")
                for member in ("jpg", ext):
                    offset, size = components[member]
                    if offset + size > tar_size:
                        raise ShardError(f"{tar_path}: truncated: sample {key!r} ends at byte {offset + size}, "
                                         f"the file has {tar_size}")
                locations.append(SampleLocation(shard_number, *components["jpg"]))
                self.annotation_locations.append(SampleLocation(shard_number, *components[ext]))
        return locations

    def __len__(self) -> int:
        return len(self.locations)

    def index_of(self, key: str) -> int:
        try:
            return self._position[key]
        except KeyError:
            raise KeyError(f"sample {key!r} is not in {self.directory}") from None

    def encoded(self, index: int) -> bytes:
        """The JPEG bytes of sample ``index`` (checked against the manifest's CRC32)."""
        return self._pread(index, self.locations[index], 0)

    def annotation(self, index: int) -> bytes:
        """The annotation member of sample ``index``: ``.cls`` digits, ``.png`` label map or ``.json``
        instances (``Manifest.kind``), checked against the manifest's CRC32."""
        return self._pread(index, self.annotation_locations[index], 1)

    def _pread(self, index: int, loc: SampleLocation, member: int) -> bytes:
        data = os.pread(self._fd(loc.shard), loc.size, loc.offset)
        tar = self.directory / self.manifest.shards[loc.shard].tar
        key = self.manifest.keys[index]
        if len(data) != loc.size:
            raise ShardError(f"{tar}: short read of sample {key!r} ({len(data)} of {loc.size} bytes)")
        if self.manifest.crc32 and zlib.crc32(data) != self.manifest.crc32[index][member]:
            raise SampleChecksumError(f"{tar}: sample {key!r}: {self._mismatch(loc, key, member)}; run "
                                      "`itpn-ds verify-shards` and re-make the shard")
        return data

    def _mismatch(self, loc: SampleLocation, key: str, member: int) -> str:
        """Why a member's CRC32 differs: the index points elsewhere than the tar's member, or its bytes changed."""
        header = os.pread(self._fd(loc.shard), TAR_BLOCK, loc.offset - TAR_BLOCK) if loc.offset >= TAR_BLOCK else b""
        name = header[:100].split(b"\0", 1)[0].decode(errors="replace")
        expected = f"{key}."
        if not (name.startswith(expected) or expected.startswith(name)):  # ustar names stop at 100 bytes
            return (f"the index offset {loc.offset} does not point at its tar member (the header there names "
                    f"{name!r}): the index does not match the tar")
        return f"CRC32 of its {'JPEG' if member == 0 else 'annotation'} differs from when it was written (damaged)"

    def read(self, key: str) -> bytes:
        return self.encoded(self.index_of(key))

    def sample(self, index: int) -> Sample:
        m = self.manifest
        return Sample(m.keys[index], self.encoded(index), m.labels[index], m.sizes[index])

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self.sample(i)

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked: descriptors' file positions are shared, reopen ours
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = os.open(self.directory / self.manifest.shards[shard].tar, os.O_RDONLY)
        return self._files[shard]

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files = {}

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            self.close()


# ----------------------------------------------------------------------------------------------- writing

def sanitize_key(relative_path: str) -> str:
    """Sample key from a path relative to the input root: no extension, unsafe characters -> ``_``."""
    stem = relative_path.rsplit(".", 1)[0] if "." in Path(relative_path).name else relative_path
    return _KEY_UNSAFE.sub("_", stem.replace(os.sep, "/"))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ShardResult:
    """What writing one shard produced (also its ``.meta.json`` sidecar)."""

    info: ShardInfo | None
    keys: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    plan_digest: str = ""
    crc32: list[list[int]] = field(default_factory=list)  # per sample: [JPEG, annotation] member CRC32


def shard_names(number: int) -> tuple[str, str, str]:
    base = f"shard-{number:05d}"
    return f"{base}.tar", f"{base}.idx", f"{base}.meta.json"


def plan_digest(items: Sequence[SourceItem], options: PreprocessOptions, spec: DenseSpec | None = None) -> str:
    """Identifies a shard's inputs and options, so a resumed run redoes shards whose plan changed."""
    dense = [[i.annotation for i in items], asdict(spec)] if spec is not None else []
    text = json.dumps([[i.path, i.key, i.label] for i in items] + [asdict(options)] + dense)
    return hashlib.sha256(text.encode()).hexdigest()


def sample_members(item: SourceItem, options: PreprocessOptions,
                   spec: DenseSpec | None) -> tuple[bytes, str, bytes, int, int]:
    """(JPEG, annotation extension, annotation bytes, width, height) of one input; raises BadImage (or its
    subclass BadAnnotation) and OSError for inputs that cannot become samples."""
    if spec is not None and spec.kind == DETECTION and not Path(item.path).is_file():
        record = json.loads(item.annotation)
        raise BadAnnotation(f"{record['annotation_file']} names image {record['file_name']!r} "
                            f"(id {record['image_id']}), which does not exist")
    data, width, height = prepare_image(Path(item.path).read_bytes(), options)
    if spec is None:
        return data, "cls", str(item.label).encode(), width, height
    if spec.kind == SEGMENTATION:
        return data, "png", check_label_map(Path(item.annotation).read_bytes(), (width, height), spec), width, height
    return data, "json", check_instances(json.loads(item.annotation), (width, height), spec), width, height


def write_shard(out_dir: Path, number: int, items: Sequence[SourceItem], options: PreprocessOptions,
                spec: DenseSpec | None = None) -> ShardResult:
    """Preprocess ``items`` into shard ``number`` (tar + index + meta sidecar), written under temporary
    names and renamed into place, the sidecar last. Bad inputs are recorded, not written. ``spec``: the
    dense kind's annotation rules (None: classification)."""
    tar_name, idx_name, meta_name = shard_names(number)
    result = ShardResult(info=None, plan_digest=plan_digest(items, options, spec))
    index_lines = []
    tmp_tar = out_dir / f".{tar_name}.tmp"
    with tarfile.open(tmp_tar, "w", format=tarfile.PAX_FORMAT) as tar:
        for item in items:
            try:
                data, ext, annotation, width, height = sample_members(item, options, spec)
            except (BadImage, OSError) as exc:
                where = f"{item.path} (sample {item.key!r})" if spec is not None else item.path
                result.bad.append((where, str(exc).replace("\t", " ").replace("\n", " ")))
                continue
            jpg_offset = _add_member(tar, f"{item.key}.jpg", data)
            ann_offset = _add_member(tar, f"{item.key}.{ext}", annotation)
            index_lines.append(f"jpg {jpg_offset} {len(data)} {item.key}.jpg "
                               f"{ext} {ann_offset} {len(annotation)} {item.key}.{ext}")
            result.keys.append(item.key)
            if spec is None:
                result.labels.append(item.label)
            result.sizes.append((width, height))
            result.crc32.append([zlib.crc32(data), zlib.crc32(annotation)])
    if index_lines:
        _atomic_write_text(out_dir / idx_name, f"{INDEX_VERSION} {len(index_lines)}\n" + "\n".join(index_lines) + "\n")
        os.replace(tmp_tar, out_dir / tar_name)
        result.info = ShardInfo(tar_name, idx_name, len(index_lines), sha256_file(out_dir / tar_name),
                                (out_dir / tar_name).stat().st_size)
    else:
        tmp_tar.unlink()
    _atomic_write_text(out_dir / meta_name, json.dumps(asdict(result)))
    return result


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append a regular file; returns the byte offset of its data in the tar."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))
    padded = -(-len(data) // TAR_BLOCK) * TAR_BLOCK
    return tar.offset - padded


def load_finished(out_dir: Path, number: int, items: Sequence[SourceItem], options: PreprocessOptions,
                  spec: DenseSpec | None = None) -> ShardResult | None:
    """The sidecar of a shard an earlier run finished with the same plan, or None (made again) when there
    is none, the plan differs, or the shard no longer has the size and sha256 the sidecar recorded
    (truncated or damaged since: said on stderr)."""
    tar_name, _, meta_name = shard_names(number)
    meta = out_dir / meta_name
    if not meta.is_file():
        return None
    try:
        raw = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return None
    if raw.get("plan_digest") != plan_digest(items, options, spec) or "crc32" not in raw:
        return None
    info = ShardInfo(**raw["info"]) if raw["info"] else None
    if info is not None and not _shard_intact(out_dir / tar_name, info):
        print(f"[make-shards] {out_dir / tar_name}: finished earlier but no longer matches its sidecar (missing, "
              "truncated or damaged): made again", file=sys.stderr, flush=True)
        return None
    return ShardResult(info, raw["keys"], raw["labels"], [tuple(s) for s in raw["sizes"]],
                       [tuple(b) for b in raw["bad"]], raw["plan_digest"], raw["crc32"])


def _shard_intact(tar: Path, info: ShardInfo) -> bool:
    return tar.is_file() and tar.stat().st_size == info.bytes and sha256_file(tar) == info.sha256


def plan_shards(items: Sequence[SourceItem], target_bytes: int = 1 << 30, num_shards: int = 0
                ) -> list[list[SourceItem]]:
    """Consecutive groups of ``items``: with ``num_shards`` > 0 exactly that many, cut where the input bytes
    reach each 1/num_shards of the total (at least one item each); else groups whose input files add up to
    about ``target_bytes``. Sizes are of the input files: re-encoding with a size cap makes shards smaller."""
    sizes = [os.path.getsize(item.path) if os.path.exists(item.path) else 0 for item in items]
    if num_shards > 0:
        return _groups_by_count(items, sizes, num_shards)
    groups: list[list[SourceItem]] = [[]]
    total = 0
    for item, size in zip(items, sizes):
        if groups[-1] and total + size > target_bytes:
            groups.append([])
            total = 0
        groups[-1].append(item)
        total += size
    return [g for g in groups if g]


def _groups_by_count(items: Sequence[SourceItem], sizes: Sequence[int], num_shards: int) -> list[list[SourceItem]]:
    """``num_shards`` consecutive non-empty groups of about equal input bytes: group i starts at the first item
    with i/num_shards of the total bytes before it, moved just enough to leave every group one item."""
    if num_shards > len(items):
        raise ShardError(f"--num-shards {num_shards} is more than the {len(items)} input images: give at most "
                         f"{len(items)}")
    scaled_before = [b * num_shards for b in itertools.accumulate(sizes, initial=0)][:-1]  # bytes before each item
    total = sum(sizes)
    starts = [0]
    for i in range(1, num_shards):
        ideal = bisect.bisect_left(scaled_before, i * total) if total else i * len(items) // num_shards
        starts.append(min(max(ideal, starts[-1] + 1), len(items) - (num_shards - i)))
    bounds = [*starts, len(items)]
    return [list(items[bounds[i]:bounds[i + 1]]) for i in range(num_shards)]


def _write_job(job: tuple[Path, int, list[SourceItem], PreprocessOptions, DenseSpec | None]
               ) -> tuple[int, ShardResult, bool]:
    out_dir, number, items, options, spec = job
    finished = load_finished(out_dir, number, items, options, spec)
    if finished is not None:
        return number, finished, True
    return number, write_shard(out_dir, number, items, options, spec), False


def write_shards(items: Sequence[SourceItem], out_dir: str | Path, classes: dict[str, int], source: str,
                 options: PreprocessOptions = PreprocessOptions(), target_shard_bytes: int = 1 << 30,
                 num_workers: int = 1, progress: bool = True, spec: DenseSpec | None = None,
                 rejected: Sequence[tuple[str, str]] = (), num_shards: int = 0) -> Manifest:
    """Write ``items`` as shards under ``out_dir`` with ``num_workers`` processes; shards finished by an
    earlier run with the same plan are kept. The shards hold about ``target_shard_bytes`` of input each, or
    with ``num_shards`` > 0 there are exactly that many (``plan_shards``). Writes ``bad_files.tsv`` and ``manifest.json``.
    ``spec``: a segmentation or detection shard's annotation rules (None: classification); ``classes``
    then maps names to training ids and must hold ``spec.num_classes`` entries. ``rejected``: (path, reason) of
    inputs refused before writing (a class outside the list), reported and counted with the bad files."""
    if not items:
        raise ShardError(f"{source}: no input images")
    if spec is not None and options.max_short_side:
        raise ShardError(f"{source}: --max-short-side is not supported for {spec.kind} shards (the annotations "
                         "would need the same resize); shard the images at their own size")
    if spec is not None and len(classes) != spec.num_classes:
        raise ShardError(f"{source}: {len(classes)} class names for {spec.num_classes} classes")
    _check_unique_keys(items, source)
    groups = plan_shards(items, target_shard_bytes, num_shards)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(out_dir, n, g, options, spec) for n, g in enumerate(groups)]
    results: dict[int, ShardResult] = {}
    started, done = time.monotonic(), 0
    if num_workers > 1:
        with get_context("spawn").Pool(num_workers) as pool:
            for number, result, skipped in pool.imap_unordered(_write_job, jobs):
                results[number] = result
                done += len(groups[number])
                _report_progress(progress, len(results), len(jobs), done, len(items), started, skipped)
    else:
        for job in jobs:
            number, result, skipped = _write_job(job)
            results[number] = result
            done += len(groups[number])
            _report_progress(progress, len(results), len(jobs), done, len(items), started, skipped)
    manifest = _assemble(results, classes, source, options, out_dir, rejected)
    if spec is not None:
        manifest.kind, manifest.ignore_index = spec.kind, spec.ignore_index
        manifest.reduce_zero_label, manifest.category_ids = spec.reduce_zero_label, list(spec.category_ids)
    manifest.save(out_dir)
    return manifest


def _check_unique_keys(items: Sequence[SourceItem], source: str) -> None:
    first_path: dict[str, str] = {}
    for item in items:
        if item.key in first_path:
            raise ShardError(f"{source}: {item.path} and {first_path[item.key]} both map to sample key "
                             f"{item.key!r} (they differ only in extension or in characters outside "
                             "[A-Za-z0-9_/-])")
        first_path[item.key] = item.path


def _report_progress(enabled: bool, shards_done: int, shards: int, done: int, total: int, started: float,
                     skipped: bool) -> None:
    if not enabled:
        return
    rate = done / max(time.monotonic() - started, 1e-9)
    note = " (finished earlier, kept)" if skipped else ""
    print(f"[make-shards] shard {shards_done}/{shards}{note}  samples {done}/{total}  {rate:.0f} samples/s",
          file=sys.stderr, flush=True)


def _assemble(results: dict[int, ShardResult], classes: dict[str, int], source: str,
              options: PreprocessOptions, out_dir: Path, rejected: Sequence[tuple[str, str]]) -> Manifest:
    shards, keys, labels, sizes, bad, crc32 = [], [], [], [], list(rejected), []
    for number in sorted(results):
        r = results[number]
        bad.extend(r.bad)
        if r.info is not None:
            shards.append(r.info)
            keys += r.keys
            labels += r.labels
            sizes += r.sizes
            crc32 += r.crc32
    report = "path\treason\n" + "".join(f"{path}\t{reason}\n" for path, reason in bad)
    _atomic_write_text(out_dir / BAD_REPORT_NAME, report)
    return Manifest(shards, keys, labels, sizes, dict(classes), source, asdict(options), num_bad=len(bad),
                    crc32=crc32)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
