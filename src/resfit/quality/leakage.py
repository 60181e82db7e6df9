"""Find images that appear in more than one split (train / val / test leakage).

A photo in both train and test makes the test accuracy a memory test. Two kinds are found:

- ``exact``: byte-identical files (sha256 of the file), e.g. the same file copied twice;
- ``near``: the same picture re-encoded, resized, slightly brightened or stored with a different
  EXIF orientation: a 64-bit perceptual hash (pHash: the signs of the 8x8 lowest 2-D DCT
  frequencies of a 32x32 grey thumbnail, against their median) within a Hamming distance;
- ``embed`` (opt-in, ``embedder=``): a crop, a slight rotation or a mirror image moves the
  pHash's bits, but not a trained network's pooled features much: pairs across splits whose
  embeddings (:class:`resfit.inference.embed.Embedder`, mirror-invariant) have a cosine similarity of at
  least a threshold. How alike distinct photos look depends on the network and the data (a
  CIFAR ResNet-56's 32 px features put distinct flowers at cosines up to 0.98, where a crop
  sits at 0.95), so by default the threshold is measured on each scan: the cosine that only
  :data:`EMBED_FPR` of the pairs of images *within* a split reach (leaks are pairs across
  splits, so these pairs hold none of them). bench/leakage.py measured what that finds. Expect
  about ``EMBED_FPR * len(train) * len(val)`` false pairs (21 for flowers5's 2,900 x 736;
  about one in a scan too small to have 1 / EMBED_FPR pairs within its splits): they are
  reported with their ``similarity`` to look at, and ``--leakage remove`` drops them too.

Speed: JPEGs are decoded with PIL's ``draft`` mode (the decoder scales by 1/2..1/8 in the DCT
domain, so a 4000 px photo costs about as much as a 500 px one) in a thread pool (PIL releases
the GIL while decoding); the all-pairs comparison is a vectorised XOR + popcount.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:  # the embedding signal is opt-in; torch is imported only when it is used
    from ..inference.embed import Embedder
from ..data.fingerprints import ImageHash, hamming, hash_images

log = logging.getLogger("resfit")

__all__ = ["EMBED_FPR", "Duplicate", "find_duplicates", "similarity_threshold", "remove_leaks"]

EMBED_FPR = 1e-5  # share of pairs of distinct images the embedding signal may report


@dataclass(frozen=True)
class Duplicate:
    """One pair of matching images in two different splits (``split_a`` comes first in order)."""

    split_a: str
    path_a: Path
    split_b: str
    path_b: Path
    kind: Literal["exact", "near", "embed"]
    distance: int  # Hamming distance of the perceptual hashes; 0 for exact copies, -1 unknown
    similarity: float | None = None  # cosine of the embeddings, for kind "embed"

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["path_a"], d["path_b"] = str(self.path_a), str(self.path_b)
        return d


def _near_pairs(a: np.ndarray, b: np.ndarray, max_distance: int) -> Iterable[tuple[int, int, int]]:
    # Blocks of rows keep the XOR matrix small (4096 x len(b) uint64).
    for start in range(0, len(a), 4096):
        block = a[start : start + 4096, None] ^ b[None, :]
        dist = np.bitwise_count(block)
        rows, cols = np.nonzero(dist <= max_distance)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            yield start + r, c, int(dist[r, c])


def _hash_duplicates(
    name_a: str, hs_a: list[ImageHash], name_b: str, hs_b: list[ImageHash], max_distance: int
) -> list[Duplicate]:
    """The pairs of split ``name_a`` and split ``name_b`` with the same bytes (``exact``) or
    pHashes at most ``max_distance`` bits apart (``near``, when not exact)."""
    found: list[Duplicate] = []
    by_sha: dict[str, list[ImageHash]] = {}
    for h in hs_b:
        by_sha.setdefault(h.sha256, []).append(h)
    exact: set[tuple[Path, Path]] = set()
    for h in hs_a:
        for other in by_sha.get(h.sha256, ()):
            exact.add((h.path, other.path))
            found.append(Duplicate(name_a, h.path, name_b, other.path, "exact", 0))

    with_a = [h for h in hs_a if h.phash is not None]
    with_b = [h for h in hs_b if h.phash is not None]
    if not with_a or not with_b:
        return found
    arr_a = np.array([h.phash for h in with_a], dtype=np.uint64)
    arr_b = np.array([h.phash for h in with_b], dtype=np.uint64)
    for i, j, d in _near_pairs(arr_a, arr_b, max_distance):
        pa, pb = with_a[i].path, with_b[j].path
        if (pa, pb) not in exact and pa != pb:
            found.append(Duplicate(name_a, pa, name_b, pb, "near", d))
    return found


def find_duplicates(
    splits: dict[str, list[Path]],
    max_distance: int = 4,
    workers: int | None = None,
    *,
    embedder: Embedder | None = None,
    min_similarity: float | None = None,
    known: dict[str, tuple[str, int | None]] | None = None,
) -> list[Duplicate]:
    """Every pair of exact or near-duplicate images that sit in two *different* splits.

    ``splits``: split name -> image files, e.g. ``{"train": [...], "val": [...]}``; pairs are
    reported with the earlier split (in the dict's order) as ``split_a``. ``max_distance``: the
    largest pHash Hamming distance (of 64 bits) that still counts as the same picture; 0 finds
    only re-encodings, 4 also resized / recompressed / brightened copies, above ~10 unrelated
    photos start to match. Duplicates within one split are not reported (harmless for leakage).
    ``embedder``: also report pairs whose embeddings have a cosine of at least
    ``min_similarity`` (default: :func:`similarity_threshold` of the pairs within the splits)
    and that the hashes missed (kind ``"embed"``); costs a forward pass per image.
    ``known``: path -> (sha256, pHash) of files already fingerprinted (a shard index): those
    files are not read.
    """
    if not 0 <= max_distance <= 64:
        raise ValueError(f"max_distance must be in [0, 64], got {max_distance}")
    if min_similarity is not None and not -1 <= min_similarity <= 1:
        raise ValueError(f"min_similarity is a cosine, in [-1, 1]; got {min_similarity}")
    names = list(splits)
    all_paths = [Path(p) for name in names for p in splits[name]]
    known = known or {}
    hashed = {p: ImageHash(p, *known[str(p)]) for p in all_paths if str(p) in known}
    todo = [p for p in all_paths if p not in hashed]
    hashed |= {h.path: h for h in hash_images(todo, workers=workers)}
    per_split = {
        name: [hashed[Path(p)] for p in splits[name] if Path(p) in hashed] for name in names
    }

    found: list[Duplicate] = []
    for name_a, name_b in combinations(names, 2):
        found += _hash_duplicates(name_a, per_split[name_a], name_b, per_split[name_b],
                                  max_distance)  # fmt: skip
    if embedder is not None:
        found += _embedding_duplicates(per_split, embedder, min_similarity, found)
    order = {n: k for k, n in enumerate(names)}
    found.sort(key=lambda d: (order[d.split_a], order[d.split_b], d.kind == "embed", d.distance,
                              str(d.path_a)))  # fmt: skip
    return found


def embedding_pairs(
    a: np.ndarray, b: np.ndarray, min_similarity: float
) -> Iterable[tuple[int, int, float]]:
    """(row of ``a``, row of ``b``, cosine) for every pair of unit rows at least
    ``min_similarity`` alike: exact, in blocks of rows (1024 x len(b) scores at a time)."""
    for start in range(0, len(a), 1024):
        sims = a[start : start + 1024] @ b.T
        rows, cols = np.nonzero(sims >= min_similarity)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            yield start + r, c, float(sims[r, c])


def similarity_threshold(
    groups: Sequence[np.ndarray], fpr: float = EMBED_FPR, sample: int = 2000, seed: int = 0
) -> float:
    """The cosine that a share ``fpr`` of the pairs of distinct images reach, pairs taken
    within each group of unit rows (at most ``sample`` rows, drawn at random, per group).

    With fewer than ``1 / fpr`` pairs this is just above the most alike pair seen.
    """
    rng = np.random.default_rng(seed)
    sims = []
    for e in groups:
        if len(e) > sample:
            e = e[rng.choice(len(e), sample, replace=False)]
        sims.append((e @ e.T)[np.triu_indices(len(e), 1)])
    v = np.concatenate(sims) if sims else np.zeros(0, np.float32)
    if not len(v):
        return 1.0  # no pairs to learn from: only identical embeddings match
    k = int(fpr * len(v))  # pairs allowed above the threshold
    top = np.partition(v, len(v) - 1 - k)[len(v) - 1 - k]
    return float(min(1.0, top + 1e-4))


def _embedding_duplicates(
    per_split: dict[str, list[ImageHash]],
    embedder: Embedder,
    min_similarity: float | None,
    known: list[Duplicate],
) -> list[Duplicate]:
    """The pairs across splits that the embeddings find and the hashes did not."""
    paths = [h.path for hs in per_split.values() for h in hs if h.phash is not None]
    done, emb, _ = embedder.embed(paths)  # files that do not decode are left out
    row = {Path(p): i for i, p in enumerate(done)}
    if min_similarity is None:
        groups = [emb[[row[h.path] for h in hs if h.path in row]] for hs in per_split.values()]
        min_similarity = similarity_threshold(groups)
        log.info("embedding signal: cosine >= %.4f (%g of the pairs within splits)",
                 min_similarity, EMBED_FPR)  # fmt: skip
    phashes = {h.path: h.phash for hs in per_split.values() for h in hs}
    seen = {(d.path_a, d.path_b) for d in known}
    found = []
    for name_a, name_b in combinations(per_split, 2):
        pa = [h.path for h in per_split[name_a] if h.path in row]
        pb = [h.path for h in per_split[name_b] if h.path in row]
        if not pa or not pb:
            continue
        ea, eb = emb[[row[p] for p in pa]], emb[[row[p] for p in pb]]
        for i, j, sim in embedding_pairs(ea, eb, min_similarity):
            x, y = pa[i], pb[j]
            if (x, y) in seen or x == y:
                continue
            hx, hy = phashes.get(x), phashes.get(y)
            dist = hamming(hx, hy) if hx is not None and hy is not None else -1
            found.append(Duplicate(name_a, x, name_b, y, "embed", dist, round(sim, 4)))
    return found


def shared_groups(groups: dict[str, Sequence[str]]) -> dict[str, list[str]]:
    """The groups (patients, studies, cameras: ``--group-by``) found in more than one split,
    each with its splits in order; ``groups`` holds each split's samples' groups ("" for an
    image of no known group, never shared)."""
    where: dict[str, list[str]] = {}
    for split, values in groups.items():
        for g in dict.fromkeys(v for v in values if v):
            where.setdefault(g, []).append(split)
    return {g: splits for g, splits in sorted(where.items()) if len(splits) > 1}


def remove_leaks(
    splits: dict[str, list[Path]],
    duplicates: list[Duplicate] | None = None,
    max_distance: int = 4,
    priority: Sequence[str] = ("train", "val", "test"),
) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Which files to drop so no picture is in two splits: returns ``(kept, dropped)``.

    Of each duplicate pair the copy in the split earlier in ``priority`` stays (train keeps its
    images; val and test lose theirs); splits not in ``priority`` rank after it, in the order
    of ``splits``. ``duplicates`` defaults to ``find_duplicates(splits, max_distance)``.
    Both dicts have every split, in the order given, files in their original order.
    """
    if duplicates is None:
        duplicates = find_duplicates(splits, max_distance=max_distance)
    rank = {name: k for k, name in enumerate(priority)}
    for name in splits:
        rank.setdefault(name, len(rank))
    drop: dict[str, set[Path]] = {name: set() for name in splits}
    for d in duplicates:
        if d.split_a == d.split_b:
            continue
        loser, path = (
            (d.split_b, d.path_b)
            if rank.get(d.split_a, len(rank)) <= rank.get(d.split_b, len(rank))
            else (d.split_a, d.path_a)
        )
        drop.setdefault(loser, set()).add(Path(path))
    kept = {name: [p for p in files if Path(p) not in drop[name]] for name, files in splits.items()}
    dropped = {name: [p for p in files if Path(p) in drop[name]] for name, files in splits.items()}
    return kept, dropped
