"""What huggingface_hub and diffusers resolve a model id to, offline, from the cache that HF_HOME
(or HF_HUB_CACHE) names: the oracle of tests/tests/e2e/hf_cache.rs.

usage: hf_cache_oracle.py REPO_ID COMMIT

Prints one JSON object:
  snapshot_download     huggingface_hub.snapshot_download(REPO_ID, local_files_only=True)
  snapshot_at_commit    the same with revision=COMMIT
  pipeline_download     diffusers' DiffusionPipeline.download(REPO_ID, local_files_only=True), the
                        folder from_pretrained loads from
  pipeline_class        type(StableDiffusionPipeline.from_pretrained(REPO_ID, local_files_only=True))
  unet_in_channels      its UNet's in_channels (the pipeline really loaded)
  missing_ref_error     the exception class snapshot_download raises for revision="no-such-ref"
  missing_id_error      the exception class it raises for an id that is not cached
"""

import json
import os
import sys

# Never the network, whatever the caller's environment says.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


def error_of(f):
    try:
        f()
    except Exception as e:  # noqa: BLE001 - the class name is the answer
        return type(e).__name__
    return None


def main():
    repo, commit = sys.argv[1], sys.argv[2]
    from huggingface_hub import snapshot_download
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    out = {
        "snapshot_download": snapshot_download(repo, local_files_only=True),
        "snapshot_at_commit": snapshot_download(repo, revision=commit, local_files_only=True),
        "pipeline_download": DiffusionPipeline.download(repo, local_files_only=True),
    }
    pipe = StableDiffusionPipeline.from_pretrained(repo, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    out["pipeline_class"] = type(pipe).__name__
    out["unet_in_channels"] = pipe.unet.config.in_channels
    out["missing_ref_error"] = error_of(lambda: snapshot_download(repo, revision="no-such-ref", local_files_only=True))
    out["missing_id_error"] = error_of(lambda: snapshot_download("nobody/not-cached", local_files_only=True))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
