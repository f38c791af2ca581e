"""Serving a trained drafter in a real engine: vLLM in an environment of its own (:mod:`.vllm_env`), the script that
runs inside it (:mod:`.vllm_worker`) and the round trip against dflash-ds's own decoder (:mod:`.roundtrip`,
``dflash-ds serve-check``)."""
