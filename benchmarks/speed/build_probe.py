"""One llama-cpp-python build's decode, prefill and logits digest, printed as JSON (run with the
build's directory first on PYTHONPATH, by ``speed_table.py builds``).

    python benchmarks/speed/build_probe.py FILE.gguf THREADS REPEATS
"""

import hashlib
import json
import sys

import llama_cpp

import edgekd
from edgekd.device import llamacpp


def main() -> None:
    gguf, threads, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    r = edgekd.bench(gguf, "raspberry-pi-5", threads=threads, repeats=repeats, prompt_tokens=128, gen_tokens=64, projection=False)
    # a digest of the logits of 48 tokens decoded one at a time: equal digests = bit-identical decoding
    llm = llamacpp.load(gguf, n_ctx=128, threads=threads)
    digest = hashlib.sha256()
    for i in range(48):
        llm.eval([(i * 7919 + 13) % llm.n_vocab()])
        digest.update(llm.scores[llm.n_tokens - 1].tobytes())
    print(json.dumps({"decode_tokens_per_s": r.tg_tokens_per_s.median, "prefill_tokens_per_s": r.pp_tokens_per_s.median,
                      "logits_sha256": digest.hexdigest(), "model_facts": r.model_facts,
                      "llama_cpp_file": llama_cpp.__file__, "system_info": llama_cpp.llama_print_system_info().decode()}))


if __name__ == "__main__":
    main()
