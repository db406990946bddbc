"""Decoding poems from latents: lexicon-constrained against free spelling, greedy and with 4 beams, on
the demo's autoencoder (its decoder and lexicon; run `make demo` first). The latents are draws from the
Gaussian of the encoder's latents of 2,000 training poems, put back on the encoder's sphere -- what the
demo's diffusion model samples (its denoiser is the linear one; see docs/experiments.md).
`cold`: a fresh logits processor, every allowed-token mask worked out anew; `warm`: as many other draws
after those, with the masks cached so far, as a long-lived pipeline decodes. Word validity is
counted against all the training poems' words. Then the meter readings (trainer.pipeline.pipeline.best_scanning_readings):
the best-scanning in iambic pentameter of the pipeline's default 32 readings of each latent (the greedy
one and 31 sampled), against the greedy reading alone, both from the lexicon with its masks cached.
One thread."""
import math
import os
import time

import torch

AE = os.environ.get("BENCH_AUTOENCODER", "out/demo/autoencoder_adapted/autoencoder")
TEXTS = os.environ.get("BENCH_TEXTS", "out/demo/text_shards/train")
N = 256
CMD = "python -m bench decode"


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> list[dict]:
    from trainer.evaluation.metrics import GaussianLatents, vocabulary, word_validity
    from trainer.text.prosody import scansion
    from trainer.models.autoencoder import LatentAutoencoder
    from trainer.models.lexicon import Lexicon
    from trainer.pipeline.pipeline import DecodeConfig, best_scanning_readings
    from trainer.data.mds import read_texts

    if not os.path.isfile(os.path.join(AE, "lexicon.txt")):
        print(f"bench decode: no autoencoder with a lexicon at {AE} (run `make demo`, or set BENCH_AUTOENCODER)")
        return []
    torch.set_num_threads(1)
    ae = LatentAutoencoder.from_pretrained(AE)
    texts = read_texts(TEXTS, "text")
    fit = texts[::max(1, len(texts) // 2000)]
    z = torch.cat([ae.encode(fit[i:i + 250]) for i in range(0, len(fit), 250)]).numpy()
    draws = GaussianLatents(z).sample(2 * N, seed=0)
    draws = draws / draws.norm(dim=-1, keepdim=True) * math.sqrt(draws.shape[-1])
    first, second = draws[:N], draws[N:]
    vocab = vocabulary(texts)

    ae.decode(second[:2])  # warm up the forward
    rows, times = [], {}
    for beams in (1, 4):
        times[("free", beams)], free = _timed(lambda: ae.decode(first, num_beams=beams))
        ae.lexicon = Lexicon(ae.lexicon.words)  # another lexicon: a fresh processor, no masks cached
        times[("cold", beams)], lex = _timed(lambda: ae.decode(first, num_beams=beams, lexicon=True))
        times[("warm", beams)], _ = _timed(lambda: ae.decode(second, num_beams=beams, lexicon=True))
        print(f"{beams} beam(s), {N} poems: free {times[('free', beams)]:.2f} s (word validity "
              f"{word_validity(free, vocab):.3f}), lexicon cold {times[('cold', beams)]:.2f} s / warm "
              f"{times[('warm', beams)]:.2f} s (word validity {word_validity(lex, vocab):.3f})", flush=True)
    meter, n_read = "iambic pentameter", DecodeConfig().meter_readings
    t_greedy, greedy = _timed(lambda: ae.decode(second, lexicon=True))
    t_read, read = _timed(lambda: best_scanning_readings(ae, second, ae.decode(second, lexicon=True), [meter] * N, n_read,
                                                 lexicon=True))
    scans = (lambda ts: sum(scansion(t, meter) for t in ts) / len(ts))
    print(f"{meter}, {N} poems from the lexicon: greedy {t_greedy:.2f} s (scansion {scans(greedy):.3f}), "
          f"best of {n_read} readings {t_read:.2f} s (scansion {scans(read):.3f})", flush=True)
    meter_row = {"benchmark": f"decode {N} poems for a meter, best-scanning of {n_read} readings ÷ the greedy "
                              f"reading (time; scansion {scans(greedy):.2f} -> {scans(read):.2f})",
                 "ratio": t_read / t_greedy, "goal": f"≤ {n_read}", "command": CMD}
    for beams, name in ((1, "greedy"), (4, "4 beams")):
        rows.append({"benchmark": f"decode {N} poems ({name}), lexicon ÷ free spelling, first call (no masks cached)",
                     "ratio": times[("cold", beams)] / times[("free", beams)], "goal": "reported", "command": CMD})
        rows.append({"benchmark": f"the same, {N} other poems after it (masks cached)",
                     "ratio": times[("warm", beams)] / times[("free", beams)], "goal": "≤ 2", "command": CMD})
    return rows + [meter_row]
