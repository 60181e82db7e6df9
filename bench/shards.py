"""Benchmark: which shard library `resfit prepare` writes and `resfit train SHARDS` reads.

Candidates: WebDataset (tar shards), MosaicML Streaming (MDS shards) and LitData (chunked
binary shards). Each stores the same pre-resized JPEGs (flowers5 photos, shorter side 256, JPEG
quality 93: what `resfit prepare` writes for 224 px training). Each is read through a torch
DataLoader that decodes every JPEG and applies resfit's "standard" augmentation (random
resized crop to 224, flip, normalise), batch 32, 2 epochs, at 1 and 2 workers; worker start-up
counts, as a run pays it every epoch. Two ways of reading:

- **native**: the library's own shuffled iteration (WebDataset: shard shuffle + a 1,000-sample
  buffer, split by node and worker; Streaming and LitData: their own samplers and shuffles).
- **by index**: resfit's order (:class:`resfit.data.sources.Sharding` deals sample indices to the
  batch slots, which is what makes a 2-rank run equal a 1-rank run), read as ``dataset[i]``
  in a map-style Dataset. WebDataset 1.0 has no random access (its indexed ``wids`` reader is
  gone from 1.x), so it has no such row: resfit cannot use it without giving up its sharding.

The folder row is resfit's stream mode on the original files (decode at 2x the base size with
PIL's draft mode, resize, crop), the baseline, measured in the same run.

Last figures (python bench/shards.py, 512 flowers5 photos, 2 cores of an Intel Xeon with AMX
and AVX512_BF16, torch 2.14.1, webdataset 1.0.2, mosaicml-streaming 0.13.0, litdata 0.2.76,
2026-12-05):
  images/s (ratio to the folder baseline of the same run)   1 worker        2 workers
  folder (resfit stream mode, baseline)                    232.9 (1.00x)   445.3 (1.00x)
  webdataset, native                                       256.6 (1.10x)   479.7 (1.08x)
  streaming, native                                        239.3 (1.03x)   468.2 (1.05x)
  streaming, by index                                      263.5 (1.13x)   493.1 (1.11x)
  litdata, native                                          259.8 (1.12x)   495.4 (1.11x)
  litdata, by index                                        261.4 (1.12x)   478.5 (1.07x)
  writing 512 pre-resized JPEGs (16.5 MB): webdataset 0.07 s, streaming 0.09 s, litdata
  0.23 s (two processes); pre-resizing them from the photos took 0.6 s.
The rates are within 10% of each other: decoding a 256 px JPEG and cropping it is the cost,
not the container. Shards beat the folder by ~10% here (the photos are ~320x240, so the
pre-resize saves little; on camera photos it saves the large decode).

What decides it, besides the rates:
- Random access by index: Streaming (``get_item``) and LitData (``__getitem__``) have it,
  WebDataset 1.x does not.
- Installing: mosaicml-streaming 0.13 pins numpy<2.2 (this environment has 2.4: pip would
  downgrade it) and pulls transformers, azure, google-cloud, oci and paramiko; it also
  imports transformers at start-up (measured here with a stub, installed apart with
  ``pip --target``). LitData adds boto3 and obstore; WebDataset adds braceexpand.
- Writing: LitData's ``optimize()`` writes in parallel processes and resumes a killed run
  (``use_checkpoint=True``; ``keep_data_ordered`` keeps sample i at index i). Streaming's
  MDSWriter is one writer; WebDataset's ShardWriter too.
- Object storage: all three read s3:// (LitData and Streaming also gs:// and azure://, with a
  local cache of the chunks they touch).
- Resume mid-epoch and per-rank/per-worker splitting: all three have their own (state_dict
  of the StreamingDataLoader for LitData/Streaming; WebDataset has none for resume). resfit
  does not need them: its order, its per-image seeds and its checkpoint give both, and read
  by index they hold for any number of ranks.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
import types
import warnings
import zipfile
from pathlib import Path

import torch
from _common import FLOWERS_ZIP

from resfit.apps.benchmark.common import machine_summary
from resfit.core.config import AugmentConfig
from resfit.core.threads import worker_init
from resfit.data.augmentation import train_transform
from resfit.data.decode import load_image, resize_shorter, to_tensor
from resfit.data.preprocessing import base_size_for
from resfit.data.samples import Sample
from resfit.data.sources import Sharding
from resfit.models.weights import IMAGENET_MEAN, IMAGENET_STD

IMG, BATCH = 224, 32
TF = train_transform(AugmentConfig("standard"), IMG, IMAGENET_MEAN, IMAGENET_STD)


def _decode(data: bytes) -> torch.Tensor:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return TF(to_tensor(img.convert("RGB")))


def _jpeg(path: Path, base: int) -> bytes:
    buf = io.BytesIO()
    resize_shorter(load_image(path, max_side=base * 2), base).save(buf, "JPEG", quality=93)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Writers


def write_wds(items: list[tuple[bytes, int]], out: Path) -> list[str]:
    import webdataset as wds

    out.mkdir(parents=True)
    with wds.ShardWriter(str(out / "shard-%05d.tar"), maxcount=64, verbose=0) as w:
        for i, (jpg, label) in enumerate(items):
            w.write({"__key__": f"{i:08d}", "jpg": jpg, "cls": label})
    return sorted(str(p) for p in out.glob("*.tar"))


def write_mds(items: list[tuple[bytes, int]], out: Path) -> None:
    from streaming import MDSWriter

    with MDSWriter(out=str(out), columns={"jpg": "bytes", "label": "int"}, size_limit=1 << 26) as w:
        for jpg, label in items:
            w.write({"jpg": jpg, "label": label})


def _lit_item(item: tuple[bytes, int]) -> dict:
    return {"jpg": item[0], "label": item[1]}


def write_lit(items: list[tuple[bytes, int]], out: Path) -> None:
    import litdata

    litdata.optimize(_lit_item, items, str(out), chunk_bytes="64MB", num_workers=2,
                     keep_data_ordered=True, verbose=False, start_method="fork")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Readers


class ByIndex(torch.utils.data.Dataset):
    """A map-style view of a library dataset: resfit's sampler picks the indices."""

    def __init__(self, ds, kind: str) -> None:
        self.ds, self.kind = ds, kind  # made here, before the workers fork

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, i: int):
        row = self.ds.get_item(i) if self.kind == "mds" else self.ds[i]
        return _decode(row["jpg"]), int(row["label"])


class Folder(torch.utils.data.Dataset):
    def __init__(self, samples: list[Sample], base: int) -> None:
        self.samples, self.base = samples, base

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        return TF(to_tensor(resize_shorter(load_image(s.path, self.base * 2), self.base))), s.label


def _rate(make_loader, epochs: int) -> float:
    seen, t0 = 0, time.perf_counter()
    for e in range(epochs):
        for x, _ in make_loader(e):
            seen += len(x)
    return seen / (time.perf_counter() - t0)


def _indexed(dataset, n: int, workers: int):
    sharding = Sharding.plan(n, BATCH, 0, 1, seed=0)

    def make(epoch: int):
        return torch.utils.data.DataLoader(dataset, batch_sampler=sharding.epoch(epoch),
                                           num_workers=workers, worker_init_fn=worker_init)  # fmt: skip

    return make


def _decode_pair(sample: tuple[bytes, bytes]) -> tuple[torch.Tensor, int]:
    return _decode(sample[0]), int(sample[1])


def _wds_native(urls: list[str], workers: int):
    import webdataset as wds

    def make(epoch: int):
        ds = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.split_by_node,
                             workersplitter=wds.split_by_worker, seed=epoch,
                             empty_check=False)
              .shuffle(1000).to_tuple("jpg", "cls")
              .map(_decode_pair)
              .batched(BATCH, partial=False))  # fmt: skip
        return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                           worker_init_fn=worker_init)  # fmt: skip

    return make


class _Mapped(torch.utils.data.IterableDataset):
    def __init__(self, inner) -> None:
        self.inner = inner

    def __iter__(self):
        for row in self.inner:
            yield _decode(row["jpg"]), int(row["label"])


def _mds_native(ds, workers: int):
    # One StreamingDataset per process and folder (a second one finds the first's shared
    # memory); it reshuffles every epoch by itself.
    def make(epoch: int):
        return torch.utils.data.DataLoader(_Mapped(ds), batch_size=BATCH, num_workers=workers,
                                           worker_init_fn=worker_init, drop_last=True)  # fmt: skip

    return make


def _lit_native(root: Path, workers: int):
    from litdata import StreamingDataLoader, StreamingDataset

    class Decoded(StreamingDataset):
        def __getitem__(self, index):
            row = super().__getitem__(index)
            return _decode(row["jpg"]), int(row["label"])

    def make(epoch: int):
        ds = Decoded(str(root), shuffle=True, seed=epoch, drop_last=True)
        return StreamingDataLoader(ds, batch_size=BATCH, num_workers=workers, drop_last=True,
                                   worker_init_fn=worker_init)  # fmt: skip

    return make


class _Stub(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return dict


class _StubFinder:
    """Imports of ``transformers.*`` get empty modules (see :func:`_stub_transformers`)."""

    def find_spec(self, name, path=None, target=None):
        import importlib.machinery

        if name == "transformers" or name.startswith("transformers."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _Stub(spec.name)
        m.__path__ = []  # type: ignore[attr-defined]
        return m

    def exec_module(self, module) -> None:
        pass


def _stub_transformers() -> None:
    """mosaicml-streaming 0.13 imports transformers at start-up (for type names and its text
    datasets); none of it runs here, and installing it would change this environment."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        sys.meta_path.insert(0, _StubFinder())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--mds-lib", default="/tmp/mds-lib",
                    help="where mosaicml-streaming was installed apart (pip install --target)")  # fmt: skip
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if not FLOWERS_ZIP.exists():
        print(f"skipped: needs {FLOWERS_ZIP}")
        return 0
    sys.path.append(args.mds_lib)
    _stub_transformers()
    work = Path(tempfile.mkdtemp(prefix="resfit-shards-"))
    base = base_size_for(IMG)
    print(machine_summary())
    try:
        with zipfile.ZipFile(FLOWERS_ZIP) as z:
            names = sorted(n for n in z.namelist() if n.startswith("train/") and n.endswith(".jpg"))
            names = names[:: max(1, len(names) // args.limit)][: args.limit]
            classes = sorted({n.split("/")[1] for n in names})
            for n in names:
                z.extract(n, work / "src")
        samples = [Sample(work / "src" / n, classes.index(n.split("/")[1])) for n in names]
        t0 = time.perf_counter()
        items = [(_jpeg(s.path, base), s.label) for s in samples]
        t_resize = time.perf_counter() - t0
        print(f"{len(items)} photos, pre-resizing to {base} px took {t_resize:.1f} s "
              f"({len(items) / t_resize:.0f}/s; {sum(len(j) for j, _ in items) / 1e6:.1f} MB)")  # fmt: skip
        writes = {}
        for name, fn in (
            ("webdataset", write_wds),
            ("streaming", write_mds),
            ("litdata", write_lit),
        ):
            t0 = time.perf_counter()
            result = fn(items, work / name)
            writes[name] = time.perf_counter() - t0
            if name == "webdataset":
                urls = result
            print(f"write {name}: {writes[name]:.2f} s", flush=True)

        from litdata import StreamingDataset as LitDataset
        from streaming import StreamingDataset as MdsDataset
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        mds = MdsDataset(local=str(work / "streaming"), shuffle=True, shuffle_seed=0,
                         batch_size=BATCH)  # fmt: skip
        lit = LitDataset(str(work / "litdata"))

        n = len(items)
        rows: list[tuple[str, int, float]] = []
        for w in (1, 2):
            cases = {
                "folder (stream mode, baseline)": _indexed(Folder(samples, base), n, w),
                "webdataset, native": _wds_native(urls, w),
                "streaming, native": _mds_native(mds, w),
                "streaming, by index": _indexed(ByIndex(mds, "mds"), n, w),
                "litdata, native": _lit_native(work / "litdata", w),
                "litdata, by index": _indexed(ByIndex(lit, "lit"), n, w),
            }
            for name, make in cases.items():
                rate = _rate(make, args.epochs)
                rows.append((name, w, rate))
                print(f"  {name:32s} {w} worker(s) {rate:7.1f} img/s", flush=True)
        base_rate = {w: r for name, w, r in rows if name.startswith("folder")}
        print("\nimages/s (decode + standard augmentation to 224, batch 32, "
              f"{args.epochs} epochs) and ratio to the folder baseline of the same run:")  # fmt: skip
        for name, w, r in rows:
            print(f"  {name:32s} {w} worker(s) {r:7.1f} img/s  {r / base_rate[w]:.2f}x")
        print("write (s): " + ", ".join(f"{k} {v:.2f}" for k, v in writes.items()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
