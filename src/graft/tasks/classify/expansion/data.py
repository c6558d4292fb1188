"""What a classifier expansion trains and is measured on: the new classes' images relabelled after the
old ones, old-class exemplars (herding, from the new data or the original run's training images), and
the held-out split that measures old and new classes together."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from graft.configuration import GraftConfig
from graft.console import plural
from graft.data.folder import scan_folder
from graft.data.samples import DatasetSplits, Sample
from graft.data.transforms import eval_transform
from graft.errors import DataError
from graft.data.class_names import plan_classes
from graft.tasks.classify.expansion.source import Source
from graft.tasks.classify.class_stats import FILE_NAME as STATS_FILE
from graft.tasks.classify.class_stats import herding
from graft.io import file_digest
from graft.tasks.classify.embeddings import EmbeddingCache


def gather_data(cfg: GraftConfig, source: Source, cache: EmbeddingCache, say: Any) -> tuple[DatasetSplits, dict[str, Any]]:
    """The expanded run's split and the record of where its parts came from.

    train: the new classes' images and the old-class rehearsal images (old-class folders in the
    data, or with ``expand.exemplars`` the herding choice among those or the original run's training
    images). val/test: the new data's held-out images plus the original run's held-out images that
    are still on disk. The latter are never trained on; the original validation images (or, in
    frozen mode, their stored embeddings) calibrate the new rows, so old classes are best measured
    on the original run's test images."""
    d, old = cfg.data, source.classes
    scanned = scan_folder(d.dir, val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=cfg.solver.seed, strict=d.strict, max_pixels=d.max_pixels, min_classes=1, empty_ok=False, known_classes=old)
    # An old class with images in val/ or test/ alone is measured, not rehearsed.
    new, rehearsal = plan_classes(old, sorted({scanned.classes[s.label] for s in scanned.train}), Path(d.dir))
    classes = old + new
    index = {name: i for i, name in enumerate(classes)}

    def relabel(samples: list[Sample]) -> list[Sample]:
        return [Sample(s.path, index[scanned.classes[s.label]]) for s in samples]

    train, val, test = relabel(scanned.train), relabel(scanned.val), relabel(scanned.test)
    exemplar_source = None
    n = cfg.expand.exemplars
    if n is not None:
        given = [s for s in train if s.label < len(old)]
        pool = given
        if not given:
            if source.splits is None:
                raise DataError(f"--exemplars {n}: no old-class folders in {d.dir} and no record of the original training images ({source.dir / 'splits.json'} is missing)")
            pool = [Sample(s.path, s.label) for s in source.splits.train if s.path.is_file()]
            if not pool and n > 0:
                raise DataError(f"--exemplars {n}: none of the original training images listed in {source.dir / 'splits.json'} is on disk, and {d.dir} has no old-class folders; add some images of the old classes to {d.dir}/CLASS/")
            exemplar_source = str(source.dir / "splits.json")
        else:
            exemplar_source = str(d.dir)
        chosen = choose_exemplars(pool, n, len(old), cache, source.preprocessing)
        train = [s for s in train if s.label >= len(old)] + chosen
        say(f"exemplars: {len(chosen)} old-class images ({n} per class at most, chosen by herding) from {exemplar_source}")
    original_heldout: list[Sample] = []
    if source.splits is not None:
        # By content, not path: a copy of an image must not be trained on and measured as unseen.
        seen = {file_digest(s.path) for s in train + val + test}
        for part, target in ((source.splits.val, val), (source.splits.test, test)):
            extra = [Sample(s.path, s.label) for s in part if s.path.is_file() and file_digest(s.path) not in seen]
            target.extend(extra)
            original_heldout.extend(extra)
        # Old-class images here that the original model trained on would flatter it: not held out.
        trained_on = {file_digest(s.path) for s in source.splits.train if s.path.is_file()}
        dropped = {s for s in val + test if s.label < len(old) and file_digest(s.path) in trained_on}
        if dropped:
            val = [s for s in val if s not in dropped]
            test = [s for s in test if s not in dropped]
            train += sorted(dropped - set(train), key=lambda s: str(s.path))
            example = min(str(s.path) for s in dropped)
            scanned.warnings.append(f"{plural(len(dropped), 'old-class image')} in {d.dir} (e.g. {example}) {'is a training image' if len(dropped) == 1 else 'are training images'} of {source.dir}: used for rehearsal, not to measure")
    has_old = {s.label for s in train if s.label < len(old)}
    if source.stats is None and not has_old:
        raise DataError(
            f"{source.dir} has no class statistics ({STATS_FILE}) and {d.dir} has no old-class images: the new classes "
            "would learn with nothing that tells them apart from the old ones. Add a few images of each old class to "
            f"{d.dir}/<old class>/, pass --exemplars N to reuse the original training images, or retrain {source.dir} (it stores them by default)"
        )
    uncovered = [c for i, c in enumerate(old) if i not in has_old and (source.stats is None or c not in source.stats.classes)]
    warnings = list(scanned.warnings)
    if uncovered:
        warnings.append(f"old class(es) {', '.join(uncovered)} have neither stored statistics nor images here: the new rows learn nothing against them")
    if not any(s.label < len(old) for s in val + test):
        warnings.append("no held-out images of the old classes (neither old-class folders here nor the original run's held-out images on disk): forgetting cannot be measured")
    splits = DatasetSplits(scanned.root, scanned.layout, classes, train, val, test, scanned.skipped, warnings)
    spec = {
        "source_sha256": source.digest,
        "old_classes": old,
        "new_classes": new,
        "rehearsal": {"classes": rehearsal if exemplar_source is None else sorted({old[s.label] for s in train if s.label < len(old)}), "images": sum(s.label < len(old) for s in train), "from": exemplar_source or (str(d.dir) if rehearsal else None)},
        "negatives": {"class_statistics": source.stats is not None, "classes": [c for c in old if source.stats is not None and c in source.stats.classes]},
        "original_heldout": [str(s.path) for s in original_heldout],
    }
    return splits, spec


def choose_exemplars(pool: list[Sample], n: int, k: int, cache: EmbeddingCache, pre: Any) -> list[Sample]:
    """Up to ``n`` images per old class, by herding on the original model's embeddings."""
    chosen: list[Sample] = []
    for c in range(k):
        members = [s for s in pool if s.label == c]
        if not members or n == 0:
            continue
        if len(members) <= n:
            chosen.extend(members)
            continue
        emb = cache.embed(members, eval_transform(pre))
        chosen.extend(members[i] for i in sorted(herding(emb, n)))
    return chosen


def evaluation_split(splits: DatasetSplits, k: int) -> tuple[str, list[Sample]]:
    """The images expand_metrics.json reports on: for the old and for the new classes, their test
    images when there are any, else their validation images."""
    names, samples = [], []
    for part, wanted in (("old", lambda s: s.label < k), ("new", lambda s: s.label >= k)):
        test = [s for s in splits.test if wanted(s)]
        names.append(f"{part}: {'test' if test else 'val'}")
        samples += test or [s for s in splits.val if wanted(s)]
    return ", ".join(names), samples


# ---------------------------------------------------------------------------- training
