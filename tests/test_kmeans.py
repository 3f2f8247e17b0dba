import numpy as np
import pytest

from mlcseg_ray.kmeans import assign, batched_kmeans, distributed_kmeans, kmeans_arrays, l2_normalize


def blobs(n, k, d, noise, seed):
    rng = np.random.default_rng(seed)
    centers = l2_normalize(rng.normal(size=(k, d)))
    labels = rng.integers(0, k, n)
    return l2_normalize(centers[labels] + noise * rng.normal(size=(n, d))), labels, centers


def same_partition(a, b):
    """Fraction of points whose label agrees after the best one-to-one relabelling."""
    from scipy.optimize import linear_sum_assignment

    k = max(a.max(), b.max()) + 1
    m = np.zeros((k, k))
    np.add.at(m, (a, b), 1)
    r, c = linear_sum_assignment(-m)
    return m[r, c].sum() / len(a)


def test_recovers_planted_clusters_and_is_deterministic():
    x, labels, _ = blobs(6000, 6, 32, 0.1, 0)
    r1 = kmeans_arrays(x, 6, chunk=1000, seed=3, init_sample=2000)
    r2 = kmeans_arrays(x, 6, chunk=1000, seed=3, init_sample=2000)
    np.testing.assert_array_equal(r1.centroids, r2.centroids)
    pred, _ = assign(x, r1.centroids[0])
    assert same_partition(labels, pred) > 0.99
    assert r1.counts.sum() == 6000


def test_groups_cluster_independently():
    xa, la, _ = blobs(2000, 3, 16, 0.1, 1)
    xb, lb, _ = blobs(2000, 3, 16, 0.1, 2)
    x = np.concatenate([xa, xb])
    g = np.repeat([0, 1], 2000)
    res = kmeans_arrays(x, 3, groups=g, n_groups=2, chunk=700, seed=0)
    assert res.centroids.shape == (2, 3, 16)
    for grp, (xs, ls) in enumerate([(xa, la), (xb, lb)]):
        pred, _ = assign(xs, res.centroids[grp])
        assert same_partition(ls, pred) > 0.99


def test_empty_cluster_is_reseeded():
    x, _, _ = blobs(500, 2, 8, 0.05, 0)
    # ask for more clusters than there are modes: no centroid may stay empty
    res = kmeans_arrays(x, 5, seed=0)
    assert (res.counts > 0).all()


def test_fewer_distinct_points_than_k_and_identical_points():
    x = np.tile(l2_normalize(np.ones((1, 8))), (10, 1))
    res = kmeans_arrays(x, 3, seed=0)
    assert res.counts.sum() == 10 and np.isfinite(res.centroids).all()


def test_distributed_matches_in_memory_on_ray(ray_local):
    x, _, _ = blobs(3000, 4, 16, 0.1, 5)
    local = kmeans_arrays(x, 4, chunk=500, seed=1, use_ray=False)
    remote = kmeans_arrays(x, 4, chunk=500, seed=1, use_ray=True)
    np.testing.assert_array_equal(local.centroids, remote.centroids)


def test_batched_matches_per_image_kmeans():
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    B, N, D = 12, 120, 16
    x = np.zeros((B, N, D), np.float32)
    valid = np.zeros((B, N), bool)
    truth = []
    for b in range(B):
        n = int(rng.integers(60, N + 1))
        xs, lab, _ = blobs(n, 3, D, 0.1, 100 + b)
        x[b, :n], valid[b, :n] = xs, True
        truth.append(lab)
    labels, _ = batched_kmeans(x, valid, 3, seed=0)
    agree = []
    for b in range(B):
        n = valid[b].sum()
        assert (labels[b, n:] == -1).all()
        ref = KMeans(3, n_init=3, random_state=0).fit_predict(x[b, :n])
        agree.append(same_partition(ref, labels[b, :n]))
        assert same_partition(truth[b], labels[b, :n]) > 0.98
    assert np.mean(agree) > 0.99


def test_batched_fewer_points_than_k():
    x = l2_normalize(np.random.default_rng(0).normal(size=(1, 5, 4))).astype(np.float32)
    valid = np.array([[True, True, False, False, False]])
    labels, _ = batched_kmeans(x, valid, 3)
    assert labels[0, :2].tolist() == [0, 1] and (labels[0, 2:] == -1).all()


def test_no_vectors_is_an_error():
    with pytest.raises(ValueError, match="no vectors"):
        distributed_kmeans([], lambda s: s, 3)


def test_assignment_falls_back_to_the_cpu_index():
    import faiss

    from mlcseg_ray.kmeans import _flat_ip_index

    index = _flat_ip_index(8)
    if faiss.get_num_gpus() == 0:
        assert isinstance(index, faiss.IndexFlatIP)  # no GPU here: the CPU index, same results
    x = l2_normalize(np.eye(8)[:3])
    labels, sims = assign(x, x)
    assert labels.tolist() == [0, 1, 2] and np.allclose(sims, 1)
