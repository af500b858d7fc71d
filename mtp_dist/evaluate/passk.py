"""The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on
Code"): with n samples of a problem of which c pass, the probability that at least one of k
samples drawn from the n without replacement passes, 1 - C(n - c, k) / C(n, k); averaged over
the problems. Computed as a product, which stays exact where the binomials overflow."""

from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """One problem's estimate: n samples, c of them correct, k <= n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0  # every choice of k samples holds a correct one
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """The mean of pass_at_k over problems given as (n, c) pairs."""
    if not counts:
        raise ValueError("pass@k of no problems")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
