"""A synthetic interaction generator with a known, planted structure.

Used by the tests, the benchmarks and the sample bundle, so none of them needs a real
data set. The planted structure:

- items fall into ``n_clusters`` clusters (contiguous index ranges); item ``i``'s
  category is its cluster's name, ``"c<cluster>"``;
- inside a cluster items form a chain: the *successor* of an item is the next item of
  its cluster (wrapping around), so "what comes next" depends on the last item
  (recency matters);
- each user prefers one *home* cluster (probability ``home_weight``), else picks a
  cluster uniformly; inside a cluster, items are drawn with a Zipf-like popularity;
- with probability ``follow`` a user's next item is the successor of the previous one
  (when unseen), else a fresh draw; users never repeat an item (binary feedback);
- the declared signal ``plan`` equals ``"plan<home % n_plans>"`` with probability
  ``signal_fidelity`` (else a random plan); ``region`` is pure noise.

All randomness comes from ``seed``: the same arguments give the same data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["SyntheticData", "generate"]


@dataclass(frozen=True, slots=True)
class SyntheticData:
    """Interactions (parallel arrays, per user in time order) and the planted truth."""

    users: npt.NDArray[np.int64]
    items: npt.NDArray[np.int64]
    times: npt.NDArray[np.int64]
    n_users: int
    n_items: int
    item_cluster: npt.NDArray[np.int64]
    user_home: npt.NDArray[np.int64]
    signals: dict[str, dict[str, str]]
    n_clusters: int

    @property
    def item_ids(self) -> tuple[str, ...]:
        """String IDs of the items, ``"i<index>"``."""
        return tuple(f"i{i}" for i in range(self.n_items))

    @property
    def user_ids(self) -> tuple[str, ...]:
        """String IDs of the users, ``"u<index>"``."""
        return tuple(f"u{u}" for u in range(self.n_users))

    @property
    def categories(self) -> tuple[tuple[str, ...], ...]:
        """Each item's categories: its cluster's name."""
        return tuple((f"c{c}",) for c in self.item_cluster.tolist())

    def successor(self, item: int) -> int:
        """The planted next item of ``item`` (the next item of its cluster)."""
        c = int(self.item_cluster[item])
        members = np.flatnonzero(self.item_cluster == c)
        pos = int(np.searchsorted(members, item))
        return int(members[(pos + 1) % members.size])

    def interactions(self) -> Iterator[tuple[str, str, int]]:
        """``(user_id, item_id, timestamp)`` rows, as the operator builder takes them."""
        for u, i, t in zip(
            self.users.tolist(), self.items.tolist(), self.times.tolist(), strict=True
        ):
            yield f"u{u}", f"i{i}", t


def generate(
    *,
    n_users: int = 300,
    n_items: int = 200,
    n_clusters: int = 5,
    mean_length: int = 30,
    min_length: int = 8,
    home_weight: float = 0.85,
    follow: float = 0.5,
    zipf: float = 0.8,
    n_plans: int = 5,
    signal_fidelity: float = 0.9,
    start_time: int = 1_600_000_000,
    seed: int = 0,
) -> SyntheticData:
    """Generate interactions with the planted structure described in the module doc."""
    if n_items < n_clusters or n_clusters < 1:
        raise ValueError("need at least one item per cluster")
    rng = np.random.default_rng(seed)
    item_cluster = (np.arange(n_items) * n_clusters // n_items).astype(np.int64)
    members = [np.flatnonzero(item_cluster == c) for c in range(n_clusters)]
    probs = []
    for m in members:
        p = 1.0 / np.arange(1, m.size + 1) ** zipf
        probs.append(p / p.sum())
    user_home = rng.integers(0, n_clusters, size=n_users).astype(np.int64)
    users: list[int] = []
    items: list[int] = []
    times: list[int] = []
    signals: dict[str, dict[str, str]] = {}
    for u in range(n_users):
        home = int(user_home[u])
        plan = home % n_plans if rng.random() < signal_fidelity else int(rng.integers(n_plans))
        signals[f"u{u}"] = {"plan": f"plan{plan}", "region": f"r{int(rng.integers(3))}"}
        length = max(min_length, int(rng.poisson(mean_length)))
        length = min(length, n_items)
        seen: set[int] = set()
        t = start_time + int(rng.integers(0, 86_400 * 30))
        prev = -1
        for _ in range(length):
            item = -1
            if prev >= 0 and rng.random() < follow:
                c = int(item_cluster[prev])
                m = members[c]
                nxt = int(m[(int(np.searchsorted(m, prev)) + 1) % m.size])
                if nxt not in seen:
                    item = nxt
            tries = 0
            while item < 0 or item in seen:
                c = home if rng.random() < home_weight else int(rng.integers(n_clusters))
                item = int(rng.choice(members[c], p=probs[c]))
                tries += 1
                if tries > 50:
                    rest = np.setdiff1d(np.arange(n_items), np.fromiter(seen, dtype=np.int64))
                    item = int(rng.choice(rest))
            seen.add(item)
            users.append(u)
            items.append(item)
            times.append(t)
            t += (
                int(rng.integers(60, 600))
                if rng.random() < 0.8
                else int(rng.integers(3_600 * 6, 86_400 * 3))
            )
            prev = item
    return SyntheticData(
        users=np.asarray(users, dtype=np.int64),
        items=np.asarray(items, dtype=np.int64),
        times=np.asarray(times, dtype=np.int64),
        n_users=n_users,
        n_items=n_items,
        item_cluster=item_cluster,
        user_home=user_home,
        signals=signals,
        n_clusters=n_clusters,
    )
