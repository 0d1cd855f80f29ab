"""Print the (K, N) grid of `device_perf.sh layers` as bench_linear's --shapes, smallest first
(a run cut short by its time limit keeps the small shapes, where the FP8-or-not answer changes)."""

import itertools

SIDES = (512, 1024, 2048, 4096, 8192)
MODEL_SHAPES = ((2048, 6144), (2048, 5632), (5632, 2048))  # the 956M anchor model's q/k/v, gate/up, down

if __name__ == "__main__":
    shapes = sorted(set(itertools.product(SIDES, SIDES)) | set(MODEL_SHAPES), key=lambda kn: (kn[0] * kn[1], kn))
    print(",".join(f"{k}x{n}" for k, n in shapes))
