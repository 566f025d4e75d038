"""TensorFlow side of the TF tier (tests/test_eval_tf.py), run in its own process: TensorFlow and triton (which
torch loads lazily) each bring an LLVM, and loading triton after TensorFlow crashes the process.

python tests/_helpers_tf.py IN.npz OUT.npz
IN holds ``graph`` (path of the .pb), ``batch_<i>`` uint8 NHWC image batches, optionally ``pr_ref`` / ``pr_sample``
feature arrays. OUT gets ``pool_<i>``, ``spatial_<i>`` (mixed_6/conv[..., :7], flattened) and ``softmax_<i>`` per
batch, and with pr_* the ADM precision/recall from TF's own DistanceBlock (fp16 distances, fp32 fallback).
The graph is used as the ADM evaluator uses classify_image_graph_def.pb: images mapped onto ``ExpandDims:0``,
``pool_3:0`` and ``mixed_6/conv:0`` fetched, the IS softmax from the weights of ``softmax/logits/MatMul``."""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow.compat.v1 as tf  # noqa: E402


def main(src: str, dst: str) -> None:
    job = dict(np.load(src, allow_pickle=False))
    graph = tf.Graph()
    with graph.as_default():
        images = tf.placeholder(tf.float32, [None, None, None, 3])
        gd = tf.GraphDef()
        with open(str(job["graph"]), "rb") as f:
            gd.ParseFromString(f.read())
        pool, spatial = tf.import_graph_def(gd, input_map={"ExpandDims:0": images},
                                            return_elements=["pool_3:0", "mixed_6/conv:0"], name="feat")
        (mm,) = tf.import_graph_def(gd, return_elements=["softmax/logits/MatMul"], name="soft")
        spatial = spatial[..., :7]
        pool_in = tf.placeholder(tf.float32, [None, None])
        softmax = tf.nn.softmax(tf.matmul(pool_in, mm.inputs[1]))
        u, v = tf.placeholder(tf.float32, [None, None]), tf.placeholder(tf.float32, [None, None])

        def pd(x, y):
            nx = tf.reshape(tf.reduce_sum(tf.square(x), 1), [-1, 1])
            ny = tf.reshape(tf.reduce_sum(tf.square(y), 1), [1, -1])
            return tf.maximum(nx - 2 * tf.matmul(x, y, False, True) + ny, 0.0)
        d16 = pd(tf.cast(u, tf.float16), tf.cast(v, tf.float16))
        dist = tf.cond(tf.reduce_all(tf.math.is_finite(d16)), lambda: tf.cast(d16, tf.float32), lambda: pd(u, v))
    out = {}
    with tf.Session(graph=graph) as sess:
        i = 0
        while f"batch_{i}" in job:
            b = job[f"batch_{i}"]
            p, s = sess.run([pool, spatial], {images: b.astype(np.float32)})
            out[f"pool_{i}"] = p.reshape(len(b), -1)
            out[f"spatial_{i}"] = s.reshape(len(b), -1)
            out[f"softmax_{i}"] = sess.run(softmax, {pool_in: out[f"pool_{i}"]})
            i += 1
        if "pr_ref" in job:
            def d(a, b):
                return sess.run(dist, {u: a, v: b})
            ref, sample, k = job["pr_ref"], job["pr_sample"], 3
            r_ref = np.partition(d(ref, ref), k, axis=1)[:, k]
            r_s = np.partition(d(sample, sample), k, axis=1)[:, k]
            dd = d(ref, sample)
            out["pr"] = np.array([(dd <= r_ref[:, None]).any(0).mean(), (dd <= r_s[None, :]).any(1).mean()])
    np.savez(dst, **out)
    print("TF_HELPER_OK", tf.__version__)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
