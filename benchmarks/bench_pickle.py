r"""Times the streaming LIDC pickle reader on a synthetic crop pickle.

  python benchmarks/bench_pickle.py                # ~200 MB, protocols 3 and 4
  python benchmarks/bench_pickle.py --records=5000 --repeats=5

Writes a `data_lidc.pickle`-like file (dict key -> {'image': float64 128x128,
'masks': 4 uint8 128x128, 'series_uid': str}) to a temporary folder and reports
the median wall time of (a) `safe_pickle.stream_dict_records` with a callback
that keeps nothing (the unpickler alone) and (b) `load_lidc_pickle` (unpickling
plus conversion to float32 and bit-packed masks), with the throughput in MB/s.
"""

import argparse
import os
import pickle
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position


def write_pickle(path: str, records: int, protocol: int) -> int:
  """Writes `records` crop records; returns the file size in bytes."""
  rng = np.random.default_rng(0)
  image = rng.random((128, 128))
  masks = [(rng.random((128, 128)) < 0.2).astype(np.uint8) for _ in range(4)]
  # Distinct array objects per record, as a real file has (no memo sharing).
  data = {f"scan{i // 16:04d}_slice{i}": {"image": image.copy(),
                                           "masks": [m.copy() for m in masks],
                                           "series_uid": f"1.2.3.{i // 16}"}
          for i in range(records)}
  with open(path, "wb") as f:
    pickle.dump(data, f, protocol=protocol)
  return os.path.getsize(path)


def _time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--records", type=int, default=1000, help="~0.2 MB each")
  parser.add_argument("--protocols", default="3,4")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  from prosona_jax.data import safe_pickle  # pylint: disable=g-import-not-at-top
  from prosona_jax.data.lidc import load_lidc_pickle  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    for protocol in (int(p) for p in args.protocols.split(",")):
      path = os.path.join(tmp, f"crops_p{protocol}.pickle")
      size = write_pickle(path, args.records, protocol)
      mb = size / 1e6
      stream = _time(lambda: safe_pickle.stream_dict_records(path, lambda k, v: None),
                     args.repeats)
      load = _time(lambda: load_lidc_pickle(path, "lidc_crops", progress_every=0),
                   args.repeats)
      print(f"protocol {protocol}: {mb:.0f} MB, {args.records} records | stream_dict_records "
            f"{stream:.2f} s ({mb / stream:.0f} MB/s) | load_lidc_pickle {load:.2f} s "
            f"({mb / load:.0f} MB/s)")


if __name__ == "__main__":
  main()
