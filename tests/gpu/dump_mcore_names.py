"""Debug aid for the GPU runs: the megatron model's tensor names/shapes for each test architecture next to what
parallel/mapping.py expects, written as JSON (no weights loaded). `python tests/gpu/dump_mcore_names.py OUT.json`"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _gpu_common import PARITY_CONFIGS


def main() -> None:
    from r1moe.parallel import MegatronOptions, ParallelConfig, build_mcore_model, initialize_parallel
    from r1moe.parallel.mapping import stage_entries
    from r1moe.parallel.model import _local_tensors

    initialize_parallel(ParallelConfig(), seed=0)
    out = {}
    for name, cfg in PARITY_CONFIGS.items():
        try:
            (m,) = build_mcore_model(cfg, ParallelConfig(), MegatronOptions(), wrap_ddp=False)
            have = {k: list(v.shape) for k, v in _local_tensors(m).items()}
            want = {e.mcore for e in stage_entries(cfg, ParallelConfig(), 0, 0)}
            out[name] = {"missing_in_model": sorted(want - set(have)), "unmapped_in_model": sorted(set(have) - want),
                         "model": have, "state_dict_keys": sorted(m.state_dict().keys())}
        except Exception as e:  # noqa: BLE001
            import traceback

            out[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-4000:]}
        print(name, {k: (v if k != "model" and k != "state_dict_keys" else len(v)) for k, v in out[name].items()
                     if k != "trace"}, flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
