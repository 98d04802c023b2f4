"""Data pipeline throughput against the training step's appetite.

  python benchmarks/data_pipeline.py                       # loader + step tables
  python benchmarks/data_pipeline.py --sections difficulty # synthetic-data baselines

Loader: decoded, flipped, normalised 112x112 images per second from an
insightface RecordIO folder (``InsightFaceRecSource``) and from the same data as a
TFDS ArrayRecord dataset (``tfds:insightface_rec``), with ``worker_count`` 0
(decode threads in this process) and > 0 (grain worker processes). "per core"
is images per CPU-second (user + system time of this process and its workers),
so it does not depend on how many cores the machine lends. A plain PIL loop
(decode + flip + normalise, one thread, no grain) is the reference.

Step: images per second a jitted backbone forward + backward consumes at
batch 32 (``x2jax.models``), to compare with the loader rate.

Difficulty (``--sections difficulty``): on the synthetic 'small' config, raw-pixel
nearest-class-mean and logistic-regression accuracy against a small CNN
trained for a fixed number of epochs, closed-set and held-out verification.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from x2jax.data import insightface_rec, pipeline, sources, synthetic  # noqa: E402
from x2jax.data.images import decode_image, normalize  # noqa: E402


def _live_children_cpu(pid: int) -> float:
    """user + system seconds of the live descendants of ``pid`` (Linux /proc)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        for kid in kids:
            try:
                with open(f"/proc/{kid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick + _live_children_cpu(kid)
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    return total


def cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and its live worker processes."""
    s = resource.getrusage(resource.RUSAGE_SELF)
    return s.ru_utime + s.ru_stime + _live_children_cpu(os.getpid())


def make_rec(directory: str, num_images: int) -> None:
    """An insightface folder of 112x112 JPEGs (q95) from the synthetic 'large' config."""
    per_id = 40
    cfg = synthetic.get_config(
        "large", num_identities=max(1, num_images // per_id), images_per_identity=per_id
    )
    images, labels = synthetic.generate_train(cfg)
    blobs = []
    for im in images[:num_images]:
        buf = io.BytesIO()
        from PIL import Image  # pylint: disable=import-outside-toplevel

        Image.fromarray(im).save(buf, format="JPEG", quality=95)
        blobs.append(buf.getvalue())
    insightface_rec.write_insightface_rec(directory, blobs, labels[:num_images], image_size=(112, 112))


def bench_plain_pil(src, num_images: int) -> tuple[float, float]:
    """One thread: read bytes, PIL decode, flip, normalise. Returns (img/s, img per cpu-s)."""
    rng = np.random.default_rng(0)
    t0, c0 = time.perf_counter(), cpu_seconds()
    for i in range(num_images):
        img = decode_image(src[i % len(src)]["image"])
        if rng.random() < 0.5:
            img = img[:, ::-1]
        normalize(img)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return num_images / wall, num_images / cpu


def bench_loader(
    src, *, batch_size: int, batches: int, worker_count: int, read_threads: int | None
) -> tuple[float, float]:
    it = pipeline.make_train_loader(
        src,
        batch_size=batch_size,
        seed=0,
        shard_index=0,
        shard_count=1,
        worker_count=worker_count,
        read_threads=read_threads,
    )
    for _ in range(2 + 2 * worker_count):  # warm-up (worker start-up, first reads)
        next(it)
    t0, c0 = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
        b = next(it)
        assert b["image"].shape == (batch_size, *src.image_size, 3)
    wall = time.perf_counter() - t0
    cpu = cpu_seconds() - c0  # workers still alive: their time is read from /proc
    it.close()
    n = batch_size * batches
    return n / wall, n / cpu


def bench_step(name: str, image_size: int, batch_size: int, steps: int, dtype: str):
    """Jitted forward + backward of a backbone (train mode). Returns (compile s, step s)."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from x2jax import models  # pylint: disable=import-outside-toplevel

    module, variables = models.create(
        name, embedding_size=512, image_size=image_size, dtype=dtype, rng=jax.random.key(0)
    )
    images = jax.random.normal(jax.random.key(1), (batch_size, image_size, image_size, 3))

    def loss(params, batch_stats, x):
        emb, upd = module.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.mean(emb**2), upd

    step = jax.jit(jax.grad(loss, has_aux=True))
    t0 = time.perf_counter()
    jax.block_until_ready(step(variables["params"], variables["batch_stats"], images))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(step(variables["params"], variables["batch_stats"], images))
        times.append(time.perf_counter() - t0)
    return compile_s, float(np.median(times))


def difficulty(epochs: int, num_identities: int) -> list[tuple[str, float, float]]:
    """Raw-pixel baselines vs a small CNN on synthetic 'small' (closed-set acc, verification)."""
    import jax  # pylint: disable=import-outside-toplevel
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    import optax  # pylint: disable=import-outside-toplevel
    from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel

    cfg = synthetic.get_config("small", num_identities=num_identities, num_verification_pairs=2000)
    x, y = synthetic.generate_train(cfg)
    v, issame = synthetic.generate_verification(cfg)
    k = cfg.images_per_identity
    test = (np.arange(len(y)) % k) >= k - 4

    def best_threshold_acc(f):
        f = f - f.mean(0) if f.shape[1] > 1000 else f
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        sim = (f[0::2] * f[1::2]).sum(1)
        return max(np.mean((sim > t) == issame) for t in np.unique(sim))

    rows = []
    xf = x.reshape(len(x), -1).astype(np.float32)
    means = np.stack([xf[~test & (y == c)].mean(0) for c in range(num_identities)])
    d2 = (xf[test] ** 2).sum(1)[:, None] - 2 * xf[test] @ means.T + (means**2).sum(1)[None]
    raw_ver = best_threshold_acc(v.reshape(len(v), -1).astype(np.float32))
    rows.append(
        (
            "raw pixels, nearest class mean (cosine of centred pixels for verification)",
            float(np.mean(d2.argmin(1) == y[test])),
            raw_ver,
        )
    )
    clf = LogisticRegression(max_iter=300, C=0.01).fit(xf[~test] / 255.0, y[~test])
    # Verification with the linear model's class scores as the embedding.
    lin_emb = clf.decision_function(v.reshape(len(v), -1).astype(np.float32) / 255.0)
    rows.append(
        (
            "raw pixels, logistic regression (scores as embedding)",
            float(clf.score(xf[test] / 255.0, y[test])),
            best_threshold_acc(lin_emb),
        )
    )

    class Net(nn.Module):
        @nn.compact
        def __call__(self, z):
            for c in (32, 64, 128):
                z = nn.relu(nn.Conv(c, (3, 3))(z))
                z = nn.relu(nn.Conv(c, (3, 3), strides=2)(z))
            emb = nn.Dense(128)(z.reshape(z.shape[0], -1))
            return emb, nn.Dense(num_identities)(nn.relu(emb))

    net = Net()
    xn = normalize(x)
    params = net.init(jax.random.key(0), xn[:2])
    tx = optax.adam(1e-3)
    opt = tx.init(params)

    @jax.jit
    def train_step(params, opt, xb, yb):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(net.apply(p, xb)[1], yb).mean()

        g = jax.grad(loss_fn)(params)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(params, u), opt

    rng = np.random.default_rng(0)
    train_idx = np.flatnonzero(~test)
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = rng.permutation(train_idx)
        for i in range(0, len(perm) - 127, 128):
            b = perm[i : i + 128]
            xb = xn[b].copy()
            flip = rng.random(len(b)) < 0.5
            xb[flip] = xb[flip][:, :, ::-1]
            params, opt = train_step(params, opt, xb, y[b])
    train_s = time.perf_counter() - t0
    apply = jax.jit(net.apply)
    logits = np.concatenate([apply(params, xn[test][i : i + 512])[1] for i in range(0, int(test.sum()), 512)])
    vn = normalize(v)
    emb = np.concatenate(
        [
            np.asarray(apply(params, vn[i : i + 512])[0])
            + np.asarray(apply(params, vn[i : i + 512][:, :, ::-1])[0])
            for i in range(0, len(vn), 512)
        ]
    )
    rows.append(
        (
            f"small CNN (6 conv + dense 128), Adam, {epochs} epochs ({train_s:.0f} s)",
            float(np.mean(logits.argmax(1) == y[test])),
            best_threshold_acc(emb),
        )
    )
    return rows


def bench_loaders(args) -> dict[int, float]:
    """Synthetic generation time, then the loader table.

    Returns images per CPU-second by image size (112: median of the JPEG rows).
    """
    t0, c0 = time.perf_counter(), cpu_seconds()
    small_images, small_labels = synthetic.generate_train(synthetic.get_config("small"))
    print(
        f"# synthetic 'small' generate_train (24,000 images 32x32): "
        f"{time.perf_counter() - t0:.1f} s wall, {cpu_seconds() - c0:.1f} CPU-s"
    )
    small_src = sources.ArraySource(small_images, small_labels)
    with tempfile.TemporaryDirectory() as tmp:
        rec_dir = os.path.join(tmp, "manual", "custom")
        t0 = time.perf_counter()
        make_rec(rec_dir, args.images)
        print(f"# wrote {args.images} 112x112 JPEG records in {time.perf_counter() - t0:.1f} s")
        rec_src = insightface_rec.InsightFaceRecSource(rec_dir)
        from x2jax.data.tfds_builders import TfdsSource  # pylint: disable=import-outside-toplevel

        t0 = time.perf_counter()
        tfds_src = TfdsSource(
            "insightface_rec/custom",
            data_dir=os.path.join(tmp, "tfds"),
            download_and_prepare_kwargs={
                "download_config": __import__("tensorflow_datasets").download.DownloadConfig(
                    manual_dir=os.path.join(tmp, "manual")
                )
            },
        )
        print(f"# TFDS ArrayRecord prepare: {time.perf_counter() - t0:.1f} s")

        print("\n| source | worker_count | images/s (wall) | images per CPU-second |")
        print("|---|---|---|---|")
        n_plain = min(1000, args.images)
        rate, per_cpu = bench_plain_pil(rec_src, n_plain)
        print(f"| RecordIO, plain PIL loop (no grain, 1 thread) | - | {rate:,.0f} | {per_cpu:,.0f} |")
        rates_112 = []
        for label, src in (
            ("RecordIO (InsightFaceRecSource)", rec_src),
            ("TFDS ArrayRecord (tfds:insightface_rec)", tfds_src),
        ):
            for w in args.workers:
                rate, per_cpu = bench_loader(
                    src,
                    batch_size=args.batch_size,
                    batches=args.batches,
                    worker_count=w,
                    read_threads=args.read_threads,
                )
                rates_112.append(per_cpu)
                print(f"| {label}, 112x112 JPEG | {w} | {rate:,.0f} | {per_cpu:,.0f} |", flush=True)
    rate, per_cpu_32 = bench_loader(
        small_src, batch_size=args.batch_size, batches=args.batches, worker_count=0, read_threads=None
    )  # default: 0 threads
    print(
        f"| synthetic 'small' in memory (ArraySource), 32x32, no decode | 0 | {rate:,.0f} "
        f"| {per_cpu_32:,.0f} |",
        flush=True,
    )
    return {112: float(np.median(rates_112)), 32: per_cpu_32}


def bench_steps(args, per_core: dict[int, float]) -> None:
    """Backbone step table; 'loader cores needed' = consumed / loader images per CPU-second."""
    import jax  # pylint: disable=import-outside-toplevel

    print(
        f"\n| backbone fwd+bwd, batch {args.step_batch} ({args.step_dtype}, "
        f"{jax.devices()[0].platform}) | compile s | step s "
        f"| images/s consumed | loader cores needed |"
    )
    print("|---|---|---|---|---|")
    for spec in args.step_models.split(","):
        name, size = spec.split("@")
        compile_s, step_s = bench_step(name, int(size), args.step_batch, steps=2, dtype=args.step_dtype)
        consumed = args.step_batch / step_s
        rate = per_core.get(int(size), float("nan"))
        needed = f"{consumed / rate:.4f}" if np.isfinite(rate) else "-"
        print(
            f"| {name} @ {size}x{size} | {compile_s:.1f} | {step_s:.2f} | {consumed:,.1f} | {needed} |",
            flush=True,
        )
    print(
        "\n# loader cores needed = images/s consumed / loader images per CPU-second "
        "(112x112: median of the JPEG rows; 32x32: the in-memory synthetic row)"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000, help="images in the benchmark .rec")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=16, help="timed batches per loader row")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--read-threads", type=int, default=2)
    ap.add_argument(
        "--step-models",
        default="r18_tiny@32,r18@112,r50@112",
        help="name@image_size list for the step table ('' to skip)",
    )
    ap.add_argument("--step-batch", type=int, default=32)
    ap.add_argument("--step-dtype", default="float32", help="backbone compute dtype")
    ap.add_argument("--sections", default="loader,step", help="comma list of: loader, step, difficulty")
    ap.add_argument("--difficulty-ids", type=int, default=200)
    ap.add_argument("--difficulty-epochs", type=int, default=12)
    args = ap.parse_args()

    print(
        f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    sections = set(args.sections.split(","))
    loader_rates = {}
    if "loader" in sections:
        loader_rates = bench_loaders(args)
    if "step" in sections and args.step_models:
        bench_steps(args, loader_rates)
    if "difficulty" in sections:
        print(
            f"\n| synthetic 'small', {args.difficulty_ids} identities | closed-set accuracy "
            f"(chance {1 / args.difficulty_ids:.3f}) | held-out verification accuracy "
            "(best threshold) |"
        )
        print("|---|---|---|")
        for label, acc, ver in difficulty(args.difficulty_epochs, args.difficulty_ids):
            print(f"| {label} | {acc:.3f} | {ver:.3f} |", flush=True)


if __name__ == "__main__":  # grain worker processes are spawned: the guard is required
    main()
