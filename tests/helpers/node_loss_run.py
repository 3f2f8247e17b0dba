"""Run the pipeline on a several-node ``ray.cluster_utils.Cluster``, removing a worker node in the middle of
extraction and another in the middle of refinement (or none). Run as a script by test_reliability.py, so that its
Ray is its own.

    python node_loss_run.py IMAGES OUT {remove|keep}
"""

import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the helpers package
from helpers import TINY
from mlcseg_ray.core.config import Config
from mlcseg_ray.pipeline import Pipeline

NODE_LOSS_CONFIG = ["region_descriptor=masked_mean"]  # beside the tiny config, one image a shard


def remove_when(cluster, node, folder: Path, stage: str, log: list):
    def watch():
        state = folder / "_state" / stage
        while not state.is_dir() or not any(p.name.isdigit() for p in state.iterdir()):  # a first shard marker
            time.sleep(0.05)
        cluster.remove_node(node)
        log.append(f"removed a node during {stage}")

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def main():
    images, out, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1"})
    nodes = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    cfg = Config.load(None, [*TINY, "shard_size=1", *NODE_LOSS_CONFIG])
    log = []
    if mode == "remove":
        remove_when(cluster, nodes[0], out, "extract", log)
        remove_when(cluster, nodes[1], out, "refine", log)
    Pipeline(out, cfg, images=images).run()
    print("\n".join(log))
    print(f"alive nodes: {sum(n['Alive'] for n in ray.nodes())}")
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
