"""Build layer ``embed``: the ``emb_astro`` and ``emb_shen`` vectors and their HNSW indexes.

Three steps, in the orchestrator's hooks:

``prepare`` (once, main process)
    ``emb_astro``: with option ``astroclip_checkpoint`` (or ``ard build
    --astroclip-checkpoint PATH``) the published AstroCLIP SpecFormer weights
    are loaded from that local file; nothing is fetched. Without one, a
    SpecFormer (``science.specformer.SMALL_CONFIG``: AstroCLIP's patching,
    standardisation and masked-chunk pretraining, narrower and shallower for a
    CPU) is trained self-supervised on a sample of the ARD's own spectra.
    ``emb_shen``: the wavelength-aware encoder (``science.shen``) is trained
    the same way. Both trainings add a rest-frame term that uses the
    catalogue Z as a training target, never as an input to the encoder (``science.restframe``;
    for published AstroCLIP weights nothing is trained). The sample is ``train_max`` spectra (default 4000) drawn
    evenly from every partition (GALAXY targets with S/N > ``train_min_snr``);
    each encoder trains for a fixed number of optimizer steps
    (``DEFAULT_STEPS``: emb_astro 1000, emb_shen 2000; option ``steps`` sets
    both): a step budget, so the weights do not depend on how fast the
    building machine is (about 30 minutes for the two on a 2-core CPU, under
    4 minutes on a GPU). ``max_seconds`` (no default) caps the time per
    encoder as well; the training log and ``ard_meta`` then say whether it
    stopped training, and the columns depend on the machine again. Training runs on ``device`` (default ``auto``: a CUDA GPU
    when torch sees one, else the CPU; the device is logged). The recipe (``RECIPE``) and the embedding heads (region
    pooling + PCA whitening; also fitted for published AstroCLIP weights) are
    described in ``science.specformer`` / ``science.shen``: emb_shen's head is
    fitted on the training sample, emb_astro's on galaxies of every S/N
    (``head_sample``). The checkpoints go to ``artifacts/embed/`` and are reused
    while the options and the core are unchanged; which weights were used,
    their sizes and training logs go to ``ard_meta``.
``run`` (per partition, on the workers)
    embeds every spectrum; a spectrum with no good pixel gets NULL vectors and
    ``Embed_flag`` is not needed: a NULL vector says it. ``emb_astro``'s head
    places the encoder's tokens at their rest wavelength with the core's ``Z``
    (as catalogued; ZWARN is not applied, so a wrong redshift misplaces them),
    so a target with a NULL ``Z``, or whose spectrum reaches none of the head's
    rest-frame range (quasars above z ~ 2 for a galaxy sample), has a NULL
    ``emb_astro`` and still an ``emb_shen``, which needs no redshift.
``finalize`` (once)
    one USearch HNSW index per embedding (cosine, f16), keys = TargetID,
    ``indexes/<column>.usearch``, memory-mapped by ``ard_sql.open()``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ard_sql import contract, paths, similarity, spectra_store
from ard_sql.build import hats_writer
from ard_sql.build.layers.base import Partition, count, number, parse_options, positive, positive_integer

_OPTIONS = {"astroclip_checkpoint": str, "train_max": positive_integer, "train_min_snr": number(), "steps": positive_integer,
            "max_seconds": positive, "seed": count, "batch_size": positive_integer, "device": str}
#: Optimizer steps of each encoder unless option ``steps`` sets both: a step budget, not a time budget, so that the
#: columns do not depend on how fast the building machine is (bench/RESULTS.md, "A step budget"). emb_astro stops
#: at half emb_shen's budget (recipe 14): at 1000 steps its green peas found all their kind on both mocks and its
#: post-starbursts did better, at 2000 steps mk3's faint green pea lost 2-3 of 10 (bench/RESULTS.md, "emb_astro at
#: 1000 steps").
DEFAULT_STEPS = {"astro": 1000, "shen": 2000}
ASTRO_CKPT, SHEN_CKPT, TRAIN_LOG = "specformer.ckpt", "shen.ckpt", "training.json"
_MODELS: dict[str, Any] = {}


def options(raw: dict[str, Any]) -> dict[str, Any]:
    """The layer's options, types converted; an unknown name is a ValueError."""
    return parse_options("embed", raw, _OPTIONS)


def check_options(raw: dict[str, Any]) -> dict[str, Any]:
    """``options`` plus what only the build's own machine can check: a missing checkpoint file or a
    device that is neither ``auto``, ``cpu`` nor a CUDA device torch sees is a ValueError."""
    from ard_sql.science.specformer import resolve_device

    opts = options(raw)
    if "astroclip_checkpoint" in opts and not Path(opts["astroclip_checkpoint"]).is_file():
        raise ValueError(f"embed layer: astroclip_checkpoint {opts['astroclip_checkpoint']}: no such file")
    if "device" in opts:
        try:
            resolve_device(opts["device"])
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"embed layer: device {opts['device']!r}: {exc}") from None
    return opts


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def training_sample(ard_dir: Path, n_max: int, min_snr: float | None, seed: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(wave, flux, ivar, z) of up to ``n_max`` galaxy spectra with ``SNR_Median > min_snr`` (None: any S/N)
    drawn evenly from every partition.

    ``z`` is the catalogue redshift, NaN where it is missing or ZWARN is set
    (emb_shen's rest-frame training term skips those rows).
    """
    files = hats_writer.partition_files(ard_dir, paths.CORE)
    rng = np.random.default_rng(seed)
    per = max(1, int(np.ceil(n_max / max(1, len(files)))))
    fluxes, ivars, zs, wave = [], [], [], None
    for order, pixel, f in files:
        core = pq.read_table(f, columns=["TargetID", "SPECTYPE", "SNR_Median", "Z", "ZWARN"])
        gal = np.asarray(core.column("SPECTYPE").fill_null("").to_pylist(), dtype=object) == "GALAXY"
        snr = core.column("SNR_Median").fill_null(0).to_numpy()
        rows = np.flatnonzero(gal & ((snr > min_snr) if min_snr is not None else True))
        if rows.size == 0:
            continue
        pick = np.sort(rng.choice(rows, size=min(per, rows.size), replace=False))
        batch = spectra_store.read_partition(ard_dir, order, pixel, core.column("TargetID").to_numpy()[pick])
        fluxes.append(batch.flux)
        ivars.append(batch.ivar)
        z = core.column("Z").to_numpy(zero_copy_only=False)[pick].astype(np.float64)
        zwarn = core.column("ZWARN").fill_null(1).to_numpy()[pick]
        zs.append(np.where(np.isfinite(z) & (zwarn == 0), z, np.nan))
        wave = batch.wave
    if not fluxes:
        raise ValueError(f"embed layer: no galaxy spectrum{'' if min_snr is None else f' with SNR_Median > {min_snr}'} "
                         f"to train on in {ard_dir}")
    return wave, np.concatenate(fluxes)[:n_max], np.concatenate(ivars)[:n_max], np.concatenate(zs)[:n_max]


def _load_models(ard_dir: Path) -> tuple[Any, Any]:
    from ard_sql.science import shen, specformer

    folder = paths.artifact_dir(ard_dir, "embed")
    key = f"{folder}|{_file_hash(folder / ASTRO_CKPT)}|{_file_hash(folder / SHEN_CKPT)}"
    if key not in _MODELS:  # once per worker process
        _MODELS.clear()
        _MODELS[key] = (specformer.load_checkpoint(folder / ASTRO_CKPT), shen.load_checkpoint(folder / SHEN_CKPT))
    return _MODELS[key]


#: Bumped when the training recipe or the embedding head changes: cached weights are then retrained.
RECIPE = ("14: emb_astro trains 1000 steps, emb_shen 2000 (DEFAULT_STEPS); 13: emb_shen's noise-consistency term (shen.NOISE_WEIGHT); 12: a step budget (DEFAULT_STEPS) instead of 300 s, emb_astro's head fitted on galaxies of every S/N; "
          "11: emb_astro's head adds twelve rest-frame line windows of +-0.2 % (specformer.LINE_WINDOWS; mean and max), "
          "training unchanged; 10: emb_astro's head pools tokens in rest-frame regions (catalogue Z; mean and max), training unchanged; 9: crops + warmup lr 1e-3, 6-region pooling, PCA whitening eps 0.01, rest-frame term for both encoders, "
          "emb_shen grid-noise damping and grid-consistency term, S/N directions projected out (emb_astro 1, emb_shen 3; "
          "emb_astro's head now given the spectra's ivar, which recipes 7-8 did not pass, so their builds kept the S/N direction)")


def train_encoders(ard_dir: Path, opts: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """Load or train the SpecFormer and train the emb_shen encoder on the ARD's spectra; returns both and a log."""
    from ard_sql.science import shen, specformer

    try:  # before any work: a wrong device fails the build at once
        specformer.resolve_device(opts.get("device", "auto"))
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"embed layer option device={opts['device']!r}: {exc}") from exc
    seed = opts.get("seed", 0)
    wave, flux, ivar, z = head_sample(ard_dir, opts, "shen")  # emb_shen's head sample is the training sample
    log: dict[str, Any] = {"recipe": RECIPE}
    kw = {"max_seconds": opts.get("max_seconds"), "seed": seed, "device": opts.get("device", "auto")}
    if "astroclip_checkpoint" in opts:
        model = specformer.load_checkpoint(opts["astroclip_checkpoint"])
        log["astro"] = {"source": "published AstroCLIP weights", "path": opts["astroclip_checkpoint"],
                        "config": model.config.__dict__}
    else:
        model, tlog = specformer.train(flux, ivar, wave=wave, z=z, out_dim=contract.EMB_ASTRO_DIM, fit_head=False,
                                       steps=encoder_steps(opts, "astro"), **kw)
        log["astro"] = {"source": _trained_source(tlog), **tlog}
    log["astro"].update(_fit_astro_head(model, ard_dir, opts))
    smodel, slog = shen.train(wave, flux, ivar, z=z, steps=encoder_steps(opts, "shen"), **kw)
    log["shen"] = {"source": _trained_source(slog), **slog}
    return model, smodel, log


def encoder_steps(opts: dict[str, Any], encoder: str) -> int:
    """Optimizer steps ``encoder`` (``astro`` or ``shen``) trains for: option ``steps`` where given, else its
    :data:`DEFAULT_STEPS`."""
    return int(opts.get("steps", DEFAULT_STEPS[encoder]))


def head_sample(ard_dir: Path, opts: dict[str, Any], encoder: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(wave, flux, ivar, z) that ``encoder``'s head is fitted on (``opts``: the layer's options): for ``shen``
    the training sample (GALAXY spectra with SNR_Median > ``train_min_snr``), for ``astro`` galaxies of every S/N
    (recipe 12).

    The encoders train on bright spectra, but emb_astro's head (centre, whitening,
    the S/N direction projected out) must describe the population it embeds:
    fitted on the bright ones only, the faintest galaxies all fell along one
    unfitted direction and found each other rather than their own kind
    (bench/RESULTS.md, "A step budget, emb_astro's head on every S/N, and noise
    consistency"). The same for emb_shen's head cost its resampling check.
    """
    cut = opts.get("train_min_snr", 2.0) if encoder == "shen" else None
    return training_sample(ard_dir, opts.get("train_max", 4000), cut, opts.get("seed", 0))


def _fit_astro_head(model: Any, ard_dir: Path, opts: dict[str, Any]) -> dict[str, Any]:
    """Fit emb_astro's head on its ``head_sample``; returns what the training log records of it."""
    import time

    from ard_sql.science import specformer

    t0 = time.perf_counter()
    wave, flux, ivar, z = head_sample(ard_dir, opts, "astro")
    specformer.fit_embedding_head(model, wave, flux, ivar, z, out_dim=contract.EMB_ASTRO_DIM, seed=opts.get("seed", 0))
    return {"head_seconds": time.perf_counter() - t0, "head_sample": "GALAXY spectra of every S/N",
            **specformer.head_summary(model)}


def _trained_source(tlog: dict[str, Any]) -> str:
    """``ard_meta``'s words for weights the build trained: the redshift's role is said where it had one."""
    if tlog["recipe"].get("rest_weight", 0.0) > 0:
        return ("trained self-supervised on this ARD's spectra, with the catalogue Z as a rest-frame training target "
                "(never an input to the encoder)")
    return "trained self-supervised on this ARD's spectra"


def embed_spectra(astro_model: Any, shen_model: Any, wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray, z: np.ndarray,
                  batch_size: int = 64) -> dict[str, np.ndarray]:
    """Both embeddings of (n, L) spectra on the grid ``wave`` (``z``: catalogue redshifts, for emb_astro's
    rest-frame head only); NaN rows where a spectrum is unusable."""
    from ard_sql.science import shen, specformer

    return {"emb_astro": specformer.embed(astro_model, wave, flux, ivar, z, out_dim=contract.EMB_ASTRO_DIM, batch_size=batch_size),
            "emb_shen": shen.embed(shen_model, wave, flux, ivar, out_dim=contract.EMB_SHEN_DIM, batch_size=batch_size)}


class EmbedLayer:
    """Per-partition spectral embeddings with survey-wide training and indexes."""

    name = "embed"
    version = "2"
    check_options = staticmethod(check_options)

    def prepare(self, ard_dir: Path, options_: dict[str, Any], force: bool = False) -> str:
        """Load or train the two encoders; return a token naming the weights."""
        from ard_sql.science import shen, specformer

        opts = check_options(options_)
        folder = paths.artifact_dir(ard_dir, "embed")
        folder.mkdir(parents=True, exist_ok=True)
        log_path = folder / TRAIN_LOG
        core_state = json.dumps(sorted(json.loads(paths.state_file(ard_dir, paths.CORE).read_text()).items())) \
            if paths.state_file(ard_dir, paths.CORE).exists() else ""
        ckpt_hash = _file_hash(Path(opts["astroclip_checkpoint"])) if "astroclip_checkpoint" in opts else ""
        wanted = hashlib.sha256(json.dumps([opts, core_state, RECIPE, ckpt_hash], sort_keys=True).encode()).hexdigest()[:16]
        have = json.loads(log_path.read_text()) if log_path.exists() else {}
        if force or have.get("inputs") != wanted or not (folder / ASTRO_CKPT).exists() or not (folder / SHEN_CKPT).exists():
            model, smodel, log = train_encoders(ard_dir, opts)
            log["inputs"] = wanted
            specformer.save_checkpoint(model, folder / ASTRO_CKPT)
            shen.save_checkpoint(smodel, folder / SHEN_CKPT)
            paths.atomic_write_text(log_path, json.dumps(log, indent=1, default=str))
        return f"{_file_hash(folder / ASTRO_CKPT)}-{_file_hash(folder / SHEN_CKPT)}"

    def run(self, part: Partition) -> pa.Table:
        """Embed every spectrum of the partition (NULL vectors where a spectrum has no good pixel)."""
        opts = options(part.options)
        astro_model, shen_model = _load_models(part.ard_dir)
        spec = part.spectra()
        bs = opts.get("batch_size", 64)
        z = part.core.column("Z").to_numpy(zero_copy_only=False).astype(np.float64)  # NULL Z -> NaN -> NULL emb_astro
        emb = embed_spectra(astro_model, shen_model, spec.wave, spec.flux, spec.ivar, z, batch_size=bs)
        return pa.table({
            "TargetID": pa.array(spec.targetid, pa.int64()),
            "emb_astro": _vectors(emb["emb_astro"], contract.EMB_ASTRO_DIM),
            "emb_shen": _vectors(emb["emb_shen"], contract.EMB_SHEN_DIM),
        })

    @staticmethod
    def finalize(ard_dir: Path, options: dict[str, Any]) -> dict[str, str]:
        """Build the HNSW index of each embedding; return what ``ard_meta`` records."""
        files = [f for _, _, f in hats_writer.partition_files(ard_dir, "embed")]
        out: dict[str, str] = {}
        log_path = paths.artifact_dir(ard_dir, "embed") / TRAIN_LOG
        if log_path.exists():
            log = json.loads(log_path.read_text())
            for name in ("astro", "shen"):
                info = log.get(name, {})
                out[f"embed_{name}_source"] = str(info.get("source", ""))
                out[f"embed_{name}_config"] = json.dumps(info.get("config", {}), default=str)
                out[f"embed_{name}_head"] = _head_text(name, info, log.get("recipe", "1"))
                if "seconds" in info:
                    out[f"embed_{name}_training"] = (f"{info['seconds']:.1f} s, {info['steps']} steps, "
                                                     f"{info['n_train']} spectra, stopped_by_time={info['stopped_by_time']}")
        for column in similarity.EMBEDDINGS.values():
            keys, vecs = [], []
            for f in files:
                t = pq.read_table(f, columns=["TargetID", column])
                ok = t.column(column).is_valid().to_numpy(zero_copy_only=False)
                if ok.any():
                    t = t.filter(pa.array(ok))
                    keys.append(t.column("TargetID").to_numpy())
                    vecs.append(t.column(column).combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1))
            if not keys:
                continue
            info = similarity.build_index(np.concatenate(keys), np.concatenate(vecs), paths.index_file(ard_dir, column))
            out[f"index_{column}"] = json.dumps(info, default=str)
        return out


def _head_text(name: str, info: dict[str, Any], recipe: str) -> str:
    """``ard_meta``'s description of an embedding head, from the training log's entry ``info``."""
    rec = {**info.get("recipe", {}), **info}  # a trained encoder's recipe, and what the log says of its head
    snr = rec.get("snr_directions")
    snr_text = ("" if snr is None else f", {snr} direction(s) that log S/N predicts projected out" if snr
                else ", no S/N direction projected out (too few head spectra to fit one)")
    if name == "astro":
        lo, hi = rec["head_range"]
        lines = rec["head_lines"]
        pooled = (f"{rec['head_regions']} rest-frame regions (catalogue Z) of {lo:.0f}-{hi:.0f} A and {len(lines)} line "
                  f"windows of +-{100 * rec['head_line_half_width']:.1f} % ({', '.join(lines)}) x embed_dim x "
                  f"(mean, max) of final-LayerNorm tokens, projected on {rec['head_width']} principal directions (whitening eps "
                  f"{rec['whiten_eps']})")
    else:
        regions = rec.get("regions", info.get("config", {}).get("pool_regions"))
        pooled = f"{regions} wavelength regions x embed_dim, mean-pooled final-LayerNorm tokens"
    return f"{pooled}, centred + PCA-whitened on {rec.get('head_sample', 'the training sample')}{snr_text}; recipe {recipe}"


def _vectors(values: np.ndarray, dim: int) -> pa.Array:
    """(n, dim) float32 with NaN rows -> FixedSizeList array with NULL rows."""
    values = np.asarray(values, np.float32)
    bad = ~np.isfinite(values).all(axis=1)
    flat = pa.array(np.nan_to_num(values).ravel(), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(bad))
