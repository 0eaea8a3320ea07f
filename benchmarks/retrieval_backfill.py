"""Retrieval upgrades on MNIST-1D: backfilling curves, heterogeneous models, generations.

    python benchmarks/retrieval_backfill.py --work /tmp/retrieval-bench \
        --out benchmarks/results/retrieval_backfill.json

Trains v1 with ``run_upgrade`` (Ray Train, 1 worker, CPU) and the later models
in-process with the same method objects (see ``_train_local`` for why), then on the
test split (query = gallery, leave-one-out, DESIGN "Metrics"):

1. backfilling curves ``M`` vs fraction re-embedded, and their areas, for
   - a BCT new model (v2, in v1's space): random order (mean of 5 seeds),
     most-uncertain-first by the old model's head (least confidence, entropy,
     margin), and no backfill at all;
   - a plain new model (v2*, its own space): transformation ``h(v1) ~ v2*``
     trained on Ray Train then backfill (random / uncertainty), and the full
     (staged) backfill, which serves the old model until the end;
   and the same progressive backfill run for real through the library (gallery
   build + ``run_backfill`` on Ray Data, 5 chunks, a searcher reloading between
   chunks), whose per-chunk ``M`` must match the simulated curve;
2. heterogeneous: a small edge model trained with BCT against a larger cloud
   model: ``M(edge, cloud)`` vs ``M(cloud, cloud)``;
3. generations v1 -> v2 -> v3, each BCT against its parent: the matrix
   ``M(v_i, v_j)`` with AC and AM, and the registry check (v3 may search a v1
   gallery; a model whose chain leaves the space may not).

Models and data are cached under ``--work``; re-running skips what exists.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

log = logging.getLogger("retrieval_backfill")


def _train(work: str, run_name: str, **kw):
    from graceful_ray.registry import Registry
    from graceful_ray.train.config import UpgradeConfig
    from graceful_ray.train.trainer import run_upgrade

    reg = Registry(f"{work}/registry")
    marker = f"{work}/models/{run_name}.json"
    if os.path.exists(marker):
        return reg.get(json.load(open(marker))["ref"])
    _ray_init()
    t0 = time.perf_counter()
    base = dict(data=f"{work}/data", registry=f"{work}/registry", storage=f"{work}/runs", epochs=40,
                model="cnn1d", batch_size=128, cpus_per_worker=1.0, run_name=run_name)
    base.update(kw)
    result = run_upgrade(UpgradeConfig(**base))
    os.makedirs(f"{work}/models", exist_ok=True)
    m = result.published
    json.dump({"ref": m.ref, "seconds": time.perf_counter() - t0, "metrics": result.metrics},
              open(marker, "w"))
    log.info("trained %s (%s) in %.0fs: val acc %.4f", m.ref, run_name, time.perf_counter() - t0,
             result.metrics.get("val_accuracy", float("nan")))
    return m


def _train_local(work: str, run_name: str, *, name: str, model_kwargs: dict, method: str = "plain",
                 old: str | None = None, train_split: str = "train", epochs: int = 40, seed: int = 0,
                 lr: float = 3e-3, batch_size: int = 128):
    """The same objective as ``run_upgrade`` (the method objects of graceful_ray.methods,
    BCT's synthesized old-head rows, AdamW + cosine schedule), in this process.

    Used because a Ray Train run spends 10+ minutes starting on this shared machine
    (load average 50-140 while this was written), against seconds of actual training.
    """
    import torch

    from graceful_ray.data import load_split
    from graceful_ray.evaluate import predict
    from graceful_ray.methods import UpgradeContext, build_method
    from graceful_ray.models import ModelSpec, build_model
    from graceful_ray.train.step import train_step
    from graceful_ray.registry import Registry, load_model

    reg = Registry(f"{work}/registry")
    marker = f"{work}/models/{run_name}.json"
    if os.path.exists(marker):
        return reg.get(json.load(open(marker))["ref"])
    t0 = time.perf_counter()
    data = f"{work}/data"
    x, y, info = load_split(data, train_split)
    xv, yv, _ = load_split(data, "val")
    classes = sorted(int(c) for c in np.unique(y))
    pos = {c: i for i, c in enumerate(classes)}
    spec = ModelSpec("cnn1d", tuple(info.feature_shape), len(classes), dict(model_kwargs))
    torch.manual_seed(seed)
    model = build_model(spec)
    m = build_method(method)
    X, Y = torch.from_numpy(np.ascontiguousarray(x)), torch.tensor([pos[int(c)] for c in y])
    old_emb = old_logits = old_correct = None
    if old:
        om, onet = load_model(reg, old)
        po = predict(f"{work}/registry", om.ref, x)
        old_emb, old_logits = torch.from_numpy(po.embeddings), torch.from_numpy(po.logits)
        old_correct = torch.from_numpy(po.pred == y)
        means = {pos[int(c)]: torch.from_numpy(po.embeddings[y == c].mean(0)) for c in np.unique(y)}
        ctx = UpgradeContext(num_classes=len(classes), old_classes=[pos.get(c, -1) for c in om.classes],
                             old_head_weight=onet.head.weight.detach(), old_head_bias=onet.head.bias.detach(),
                             old_embedding_dim=onet.embedding_dim, new_embedding_dim=model.embedding_dim,
                             old_class_means=means)
    else:
        ctx = UpgradeContext(num_classes=len(classes), new_embedding_dim=model.embedding_dim)
    m.setup(ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = -(-len(X) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(X), generator=gen)
        for s_ in range(steps):
            idx = perm[s_ * batch_size:(s_ + 1) * batch_size]
            old = tuple(None if t is None else t[idx] for t in (old_emb, old_logits, old_correct))
            train_step(X[idx], Y[idx], old, forward=model.forward_features, method=m, optimizer=opt,
                       scheduler=sched)
    model.eval()
    with torch.no_grad():
        val_acc = float((np.asarray(classes)[model(torch.from_numpy(xv)).argmax(1).numpy()] == yv).mean())
    published = reg.publish(name, model, spec=spec, classes=classes, method=method,
                            hyperparameters={**m.hyperparameters(), "epochs": epochs, "lr": lr, "seed": seed,
                                             "train_split": train_split},
                            dataset_checksum=info.checksum, metrics={"val_accuracy": val_acc},
                            parent=old, compatible_with_parent=bool(getattr(m, "compatible", False)),
                            extra={"trained": "in-process, benchmarks/retrieval_backfill.py"})
    os.makedirs(f"{work}/models", exist_ok=True)
    json.dump({"ref": published.ref, "seconds": time.perf_counter() - t0, "metrics": {"val_accuracy": val_acc},
               "trainer": "in-process"}, open(marker, "w"))
    log.info("trained %s (%s) in-process in %.0fs: val acc %.4f", published.ref, run_name,
             time.perf_counter() - t0, val_acc)
    return published


def train_models(work: str, samples: int) -> dict:
    from graceful_ray.data import dataset_exists, make_mnist1d

    if not dataset_exists(f"{work}/data"):
        make_mnist1d(f"{work}/data", samples=samples, seed=0, scenario="data_growth", old_fraction=0.3)
    # v1 on Ray Train (run_upgrade); the rest in-process with the same objective (see _train_local).
    v1 = _train(work, "v1", name="mnist", train_split="old_train", model_kwargs={"channels": 16})
    v2 = _train_local(work, "v2-bct", name="mnist", old=v1.ref, method="bct", model_kwargs={"channels": 16}, seed=1)
    v2p = _train_local(work, "v2-plain", name="mnist-plain", model_kwargs={"channels": 16}, seed=1)
    v3 = _train_local(work, "v3-bct", name="mnist", old=v2.ref, method="bct", model_kwargs={"channels": 32}, seed=2)
    cloud = _train_local(work, "cloud", name="cloud", model_kwargs={"channels": 32, "depth": 3}, seed=3)
    edge = _train_local(work, "edge-bct", name="edge", old=cloud.ref, method="bct",
                        model_kwargs={"channels": 8, "depth": 2}, seed=4)
    edge_plain = _train_local(work, "edge-plain", name="edge-plain", model_kwargs={"channels": 8, "depth": 2}, seed=4)
    return {"v1": v1, "v2": v2, "v2p": v2p, "v3": v3, "cloud": cloud, "edge": edge, "edge_plain": edge_plain}


def _params(reg, ref: str) -> int:
    from graceful_ray.registry import load_model

    _, model = load_model(reg, ref)
    return int(sum(p.numel() for p in model.parameters()))


def _ray_init() -> None:
    """A local Ray; on a heavily shared machine the raylet can miss Ray's 30 s start-up
    window, so try a few times."""
    import ray

    if ray.is_initialized():
        return
    for attempt in range(8):
        try:
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            return
        except Exception as e:  # noqa: BLE001 - ray raises a bare Exception here
            log.warning("ray.init failed (%s); retrying", e)
            ray.shutdown()
            time.sleep(10)
    raise RuntimeError("could not start a local Ray")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/retrieval-bench")
    p.add_argument("--out", default="benchmarks/results/retrieval_backfill.json")
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--random-seeds", type=int, default=5)
    p.add_argument("--points", type=int, default=21, help="fractions on each curve")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(1)
    os.makedirs(args.work, exist_ok=True)
    t_all = time.perf_counter()
    models = train_models(args.work, args.samples)

    from graceful_ray.data import load_split
    from graceful_ray.evaluate import predict
    from graceful_ray.metrics import compatibility_matrix, m_score
    from graceful_ray.registry import Registry, load_model
    from graceful_ray.retrieval import (BackfillConfig, Gallery, GallerySearcher, TransformConfig,
                                        backfill_curve, build_gallery, check_query_model, run_backfill,
                                        train_transform, uncertainty_scores)
    from graceful_ray.retrieval.errors import EmbeddingSpaceError

    work, reg_root = args.work, f"{args.work}/registry"
    reg = Registry(reg_root)
    data = f"{work}/data"
    x, y, _ = load_split(data, "test")
    from graceful_ray.data import read_split

    test_ids = read_split(data, "test", columns=["id"]).column("id").to_numpy()
    emb = {k: predict(reg_root, m.ref, x).embeddings for k, m in models.items()}
    logits_v1 = predict(reg_root, models["v1"].ref, x).logits
    fractions = np.round(np.linspace(0, 1, args.points), 4)
    trainers = {k: json.load(open(f"{work}/models/{f}.json")).get("trainer", "ray-train")
                for k, f in (("v1", "v1"), ("v2", "v2-bct"), ("v2p", "v2-plain"), ("v3", "v3-bct"),
                             ("cloud", "cloud"), ("edge", "edge-bct"), ("edge_plain", "edge-plain"))}
    out: dict = {"command": "python " + " ".join(sys.argv), "dataset": {"samples": args.samples,
                 "gallery_and_queries": "test split", "rows": int(len(y))},
                 "models": {k: {"ref": m.ref, "method": m.method, "space": m.embedding_space,
                                "params": _params(reg, m.ref), "val_accuracy": m.metrics.get("val_accuracy"),
                                "trainer": trainers[k]}
                            for k, m in models.items()}}

    def M(q, g):
        r = m_score(emb[q] if isinstance(q, str) else q, emb[g] if isinstance(g, str) else g, y)
        return {"top1": r.top1, "top5": r.top5, "map": r.map}

    # ---------------------------------------------------------------- curves
    curves = {}
    n = len(y)
    _, v1_model = load_model(reg, models["v1"].ref)
    W, b = v1_model.head.weight.detach().numpy(), v1_model.head.bias.detach().numpy()
    for metric in ("top1", "map"):
        cs = {}
        # BCT new model: gallery starts as v1's embeddings, queries by v2.
        rnd = [backfill_curve(emb["v2"], emb["v1"], emb["v2"], y, np.random.default_rng(s).permutation(n),
                              fractions=fractions, metric=metric) for s in range(args.random_seeds)]
        cs["bct_random"] = {"values": np.mean([c.values for c in rnd], 0).tolist(),
                            "auc": float(np.mean([c.auc for c in rnd])),
                            "auc_std": float(np.std([c.auc for c in rnd])),
                            "normalized_auc": float(np.mean([c.normalized_auc for c in rnd]))}
        for kind in ("uncertainty", "entropy", "margin"):
            score = uncertainty_scores(emb["v1"], W, b, kind)
            order = np.lexsort((np.random.default_rng(0).permutation(n), -score))
            c = backfill_curve(emb["v2"], emb["v1"], emb["v2"], y, order, fractions=fractions, metric=metric)
            cs[f"bct_{kind}"] = {"values": c.values.tolist(), "auc": c.auc, "normalized_auc": c.normalized_auc}
        # Oracle-free reference: what the old model's *logits on raw inputs* would give (same as above
        # up to float error, since the head is linear on the stored embedding).
        score_raw = 1 - np.exp(logits_v1 - logits_v1.max(1, keepdims=True)).max(1) / \
            np.exp(logits_v1 - logits_v1.max(1, keepdims=True)).sum(1)
        order_raw = np.lexsort((np.random.default_rng(0).permutation(n), -score_raw))
        c = backfill_curve(emb["v2"], emb["v1"], emb["v2"], y, order_raw, fractions=fractions, metric=metric)
        cs["bct_uncertainty_from_raw_logits"] = {"auc": c.auc}
        nb = M("v2", "v1")[metric]
        cs["bct_no_backfill"] = {"values": [nb] * len(fractions), "auc": nb}
        curves[metric] = cs
    out["curves_bct"] = {"fractions": fractions.tolist(), **curves}

    # Transformation for the plain model (Ray Train), then backfill on top of it.
    tdir = f"{work}/transform-v1-v2plain"
    t0 = time.perf_counter()
    if os.path.exists(f"{tdir}/transform.json"):
        from graceful_ray.retrieval import load_transform

        tf = load_transform(tdir)
    else:
        _ray_init()
        tf = train_transform(TransformConfig(data=data, old=models["v1"].ref, new=models["v2p"].ref,
                                             registry=reg_root, out=tdir, storage=f"{work}/runs",
                                             run_name="transform-v1-v2plain", epochs=30))
    t_tf = time.perf_counter() - t0
    h_v1 = tf.apply(emb["v1"])
    emb["h_v1"] = h_v1
    _, v2p_model = load_model(reg, models["v2p"].ref)
    W2, b2 = v2p_model.head.weight.detach().numpy(), v2p_model.head.bias.detach().numpy()
    tcurves = {}
    for metric in ("top1", "map"):
        cs = {}
        rnd = [backfill_curve(emb["v2p"], h_v1, emb["v2p"], y, np.random.default_rng(s).permutation(n),
                              fractions=fractions, metric=metric) for s in range(args.random_seeds)]
        cs["transform_random"] = {"values": np.mean([c.values for c in rnd], 0).tolist(),
                                  "auc": float(np.mean([c.auc for c in rnd])),
                                  "auc_std": float(np.std([c.auc for c in rnd])),
                                  "normalized_auc": float(np.mean([c.normalized_auc for c in rnd]))}
        for name, score in (("transform_uncertainty_new_head", uncertainty_scores(h_v1, W2, b2)),
                            ("transform_uncertainty_old_head", uncertainty_scores(emb["v1"], W, b))):
            order = np.lexsort((np.random.default_rng(0).permutation(n), -score))
            c = backfill_curve(emb["v2p"], h_v1, emb["v2p"], y, order, fractions=fractions, metric=metric)
            cs[name] = {"values": c.values.tolist(), "auc": c.auc, "normalized_auc": c.normalized_auc}
        old_old, new_new = M("v1", "v1")[metric], M("v2p", "v2p")[metric]
        staged = [old_old] * (len(fractions) - 1) + [new_new]
        cs["full_backfill_staged"] = {"values": staged, "auc": float(np.trapezoid(staged, fractions))
                                      if hasattr(np, "trapezoid") else float(np.trapz(staged, fractions))}
        cs["no_transform_raw_v1_gallery"] = {"value": M("v2p", "v1")[metric]}
        tcurves[metric] = cs
    out["curves_transform"] = {"fractions": fractions.tolist(), "transform": tf.meta.get("metrics"),
                               "transform_train_s": t_tf, **tcurves}
    out["M"] = {"v1,v1": M("v1", "v1"), "v2,v1": M("v2", "v1"), "v2,v2": M("v2", "v2"),
                "v2*,v2*": M("v2p", "v2p"), "v2*,v1 (no transform)": M("v2p", "v1"),
                "v2*,h(v1)": M("v2p", "h_v1")}

    # --------------------------------------------- the real pipeline, 5 chunks
    gdir = f"{work}/gallery-pipeline"
    import shutil

    shutil.rmtree(gdir, ignore_errors=True)
    _ray_init()
    t0 = time.perf_counter()
    build_gallery(gdir, data, "test", registry=reg_root, model=models["v1"].ref)
    t_build = time.perf_counter() - t0
    searcher = GallerySearcher(gdir, registry=reg_root, query_model=models["v2"].ref, reload="off")
    pos = {int(i): k for k, i in enumerate(test_ids)}
    real = []

    def measure(snap):
        searcher.refresh()
        g = Gallery(gdir)
        rows = g.read_rows(snap)
        ids = rows.column("id").to_numpy()
        from graceful_ray.retrieval.gallery import embeddings_array

        G = np.zeros_like(emb["v1"])
        G[[pos[int(i)] for i in ids]] = embeddings_array(rows)
        frac = snap.models.get(models["v2"].ref, 0) / snap.rows
        r = m_score(emb["v2"], G, y)
        # A search through the searcher answers from this very snapshot.
        res = searcher.search(emb["v2"][:64], k=5)
        real.append({"snapshot": snap.seq, "fraction": frac, "top1": r.top1, "map": r.map,
                     "searcher_snapshot": res.snapshot})

    measure(Gallery(gdir).head())
    t0 = time.perf_counter()
    bres = run_backfill(BackfillConfig(gallery=gdir, model=models["v2"].ref, registry=reg_root,
                                       run_name="bench-uncertainty", order="uncertainty", chunks=5),
                        on_chunk=lambda snap, prog: measure(snap))
    out["pipeline"] = {"gallery_build_s": t_build, "backfill_s": time.perf_counter() - t0,
                       "chunks": bres.timings, "measured": real}
    searcher.close()

    # ------------------------------------------------------------ heterogeneous
    out["heterogeneous"] = {
        "edge": models["edge"].ref, "cloud": models["cloud"].ref,
        "params": {"edge": _params(reg, models["edge"].ref), "cloud": _params(reg, models["cloud"].ref)},
        "M(edge,cloud)": M("edge", "cloud"), "M(cloud,cloud)": M("cloud", "cloud"),
        "M(edge,edge)": M("edge", "edge"), "M(edge_plain,edge_plain)": M("edge_plain", "edge_plain"),
        "M(edge_plain,cloud)": M("edge_plain", "cloud"),
        "same_space": models["edge"].embedding_space == models["cloud"].embedding_space}

    # -------------------------------------------------------------- generations
    gens = [emb["v1"], emb["v2"], emb["v3"]]
    mats = {}
    for metric in ("top1", "map"):
        cm = compatibility_matrix(gens, y, metric=metric, full=True)
        mats[metric] = cm.to_dict()
    # Registry: v3 may search a v1 gallery (chain keeps the space); a chain that leaves it may not.
    chk = check_query_model(reg, models["v3"].ref, space=models["v1"].embedding_space,
                            gallery_models=[models["v1"].ref])
    from graceful_ray.models import ModelSpec

    _, w3 = load_model(reg, models["v3"].ref)
    spec3 = ModelSpec.from_dict(reg.get(models["v3"].ref).architecture)
    broken = [m for m in reg.versions("mnist-branch")] if "mnist-branch" in reg.list_models() else []
    if not broken:
        b1 = reg.publish("mnist-branch", w3, spec=spec3, classes=list(range(10)), parent=models["v2"].ref,
                         method="plain", extra={"note": "lineage demo: a plain child of v2 (new space)"})
        b2 = reg.publish("mnist-branch", w3, spec=spec3, classes=list(range(10)), parent=b1.ref,
                         method="bct", compatible_with_parent=True,
                         extra={"note": "lineage demo: BCT against the plain branch"})
    else:
        b2 = broken[-1]
    try:
        check_query_model(reg, b2.ref, space=models["v1"].embedding_space, gallery_models=[models["v1"].ref])
        refused = None
    except EmbeddingSpaceError as e:
        refused = str(e)
    out["generations"] = {"models": [models[k].ref for k in ("v1", "v2", "v3")], "matrix": mats,
                          "v3_on_v1_gallery": chk.describe(), "broken_chain_model": b2.ref,
                          "broken_chain_refused": refused}
    out["total_s"] = time.perf_counter() - t_all
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, default=float)
    print(report(out))
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(report(out) + "\n")
    return 0


def report(o: dict) -> str:
    L = [f"# Retrieval upgrades on MNIST-1D\n\n`{o['command']}`\n",
         f"Gallery = queries = test split ({o['dataset']['rows']} rows), leave-one-out.\n",
         "| model | method | space | params | val acc | trained |", "|---|---|---|---|---|---|"]
    for k, m in o["models"].items():
        L.append(f"| {m['ref']} | {m['method']} | {m['space']} | {m['params']} | {m['val_accuracy']:.4f} | "
                 f"{m['trainer']} |")
    L += ["", "## M(Q, G)", "", "| pair | top-1 | top-5 | mAP |", "|---|---|---|---|"]
    for k, v in o["M"].items():
        L.append(f"| M({k}) | {v['top1']:.4f} | {v['top5']:.4f} | {v['map']:.4f} |")
    for title, key in (("BCT new model (v2 in v1's space)", "curves_bct"),
                       ("Plain new model v2* with transformation h(v1)", "curves_transform")):
        c = o[key]
        L += ["", f"## Backfilling curves: {title}", "",
              "| policy | AUC top-1 | norm. AUC top-1 | AUC mAP | norm. AUC mAP |", "|---|---|---|---|---|"]
        for name in c["top1"]:
            a, m = c["top1"][name], c["map"][name]
            if "auc" not in a:
                continue
            std = f" ± {a['auc_std']:.4f}" if "auc_std" in a else ""
            na = a.get("normalized_auc")
            nm = m.get("normalized_auc")
            L.append(f"| {name} | {a['auc']:.4f}{std} | {'' if na is None else f'{na:.3f}'} | "
                     f"{m['auc']:.4f} | {'' if nm is None else f'{nm:.3f}'} |")
        fr = c["fractions"]
        sel = [i for i, f in enumerate(fr) if round(f * 10, 6) == int(round(f * 10))]
        L += ["", "top-1 at fraction " + " / ".join(f"{fr[i]:.1f}" for i in sel), ""]
        for name, a in c["top1"].items():
            if "values" in a:
                L.append(f"- {name}: " + " / ".join(f"{a['values'][i]:.3f}" for i in sel))
    p = o["pipeline"]
    L += ["", "## The same backfill through the library (Ray Data, 5 chunks, searcher reloading)", "",
          f"gallery build {p['gallery_build_s']:.1f}s, backfill {p['backfill_s']:.1f}s", "",
          "| snapshot | fraction re-embedded | top-1 | mAP | searcher answered from |", "|---|---|---|---|---|"]
    for r in p["measured"]:
        L.append(f"| {r['snapshot']} | {r['fraction']:.2f} | {r['top1']:.4f} | {r['map']:.4f} | {r['searcher_snapshot']} |")
    h = o["heterogeneous"]
    L += ["", "## Heterogeneous: edge model (BCT against the cloud model)", "",
          f"params: edge {h['params']['edge']}, cloud {h['params']['cloud']}; same space: {h['same_space']}", "",
          "| pair | top-1 | mAP |", "|---|---|---|"]
    for k in ("M(edge,cloud)", "M(cloud,cloud)", "M(edge,edge)", "M(edge_plain,edge_plain)", "M(edge_plain,cloud)"):
        L.append(f"| {k} | {h[k]['top1']:.4f} | {h[k]['map']:.4f} |")
    g = o["generations"]
    L += ["", "## Generations " + " -> ".join(g["models"]) + " (each BCT against its parent)", ""]
    for metric, cm in g["matrix"].items():
        L += [f"{metric}: AC = {cm['ac']:.3f}, AM = {cm['am']:.4f} (rows: query model, columns: gallery model)", "",
              "| Q \\ G | v1 | v2 | v3 |", "|---|---|---|---|"]
        for i, row in enumerate(cm["matrix"]):
            L.append(f"| v{i + 1} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
        L.append("")
    L += [f"registry: {g['v3_on_v1_gallery']}", "",
          f"registry: {g['broken_chain_model']} refused: {g['broken_chain_refused']}", "",
          f"total {o['total_s']:.0f}s"]
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
