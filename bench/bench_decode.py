"""Decoding poems from latents: lexicon-constrained against free spelling, greedy and with 4 beams, on
the demo's autoencoder (its decoder and lexicon; run `make demo` first, or `make demo-quick`: then the
quick demo's, and the rows say so). The latents are draws from the
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

DEMOS = {"out/demo": "", "out/demo-quick": ", the quick demo's autoencoder"}
AE, TEXTS = "autoencoder_adapted/autoencoder", "text_shards/train"
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

    if "BENCH_AUTOENCODER" in os.environ:
        ae_dir, texts_dir, which = os.environ["BENCH_AUTOENCODER"], os.environ.get("BENCH_TEXTS", ""), \
            f", autoencoder {os.environ['BENCH_AUTOENCODER']}"
    else:
        demo = next((d for d in DEMOS if os.path.isfile(os.path.join(d, AE, "lexicon.txt"))), None)
        if demo is None:
            # a failure, not an empty result: `python -m bench` keeps this benchmark's earlier rows
            raise RuntimeError(f"bench decode: no autoencoder with a lexicon at "
                               f"{' or '.join(os.path.join(d, AE) for d in DEMOS)} (run `make demo`, or set "
                               f"BENCH_AUTOENCODER and BENCH_TEXTS)")
        ae_dir, texts_dir, which = os.path.join(demo, AE), os.path.join(demo, TEXTS), DEMOS[demo]
    torch.set_num_threads(1)
    ae = LatentAutoencoder.from_pretrained(ae_dir)
    texts = read_texts(texts_dir, "text")
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
        times[("free 2", beams)], _ = _timed(lambda: ae.decode(second, num_beams=beams))
        ae.lexicon = Lexicon(ae.lexicon.words)  # another lexicon: a fresh processor, no masks cached
        times[("cold", beams)], lex = _timed(lambda: ae.decode(first, num_beams=beams, lexicon=True))
        times[("warm", beams)], _ = _timed(lambda: ae.decode(second, num_beams=beams, lexicon=True))
        print(f"{beams} beam(s), {N} poems: free {times[('free', beams)]:.2f} s / other {N} "
              f"{times[('free 2', beams)]:.2f} s (word validity {word_validity(free, vocab):.3f}), lexicon cold "
              f"{times[('cold', beams)]:.2f} s / other {N} warm {times[('warm', beams)]:.2f} s (word validity "
              f"{word_validity(lex, vocab):.3f})", flush=True)
    meter, n_read = "iambic pentameter", DecodeConfig().meter_readings
    t_greedy, greedy = _timed(lambda: ae.decode(second, lexicon=True))
    t_read, read = _timed(lambda: best_scanning_readings(ae, second, ae.decode(second, lexicon=True), [meter] * N, n_read,
                                                 lexicon=True))
    scans = (lambda ts: sum(scansion(t, meter) for t in ts) / len(ts))
    print(f"{meter}, {N} poems from the lexicon: greedy {t_greedy:.2f} s (scansion {scans(greedy):.3f}), "
          f"best of {n_read} readings {t_read:.2f} s (scansion {scans(read):.3f})", flush=True)
    meter_row = {"benchmark": f"decode {N} poems for a meter, best-scanning of {n_read} readings ÷ the greedy "
                              f"reading, both from the lexicon (time; scansion {scans(greedy):.2f} -> {scans(read):.2f}{which})",
                 "ratio": t_read / t_greedy, "goal": f"<= {n_read}", "command": CMD}
    for beams, name in ((1, "greedy"), (4, "4 beams")):
        rows.append({"benchmark": f"decode {N} poems ({name}), lexicon ÷ free spelling (time), the lexicon's first "
                                  f"call (no masks cached){which}",
                     "ratio": times[("cold", beams)] / times[("free", beams)], "goal": "reported", "command": CMD})
        rows.append({"benchmark": f"the same on {N} other poems, the lexicon's second call (masks of the first cached)",
                     "ratio": times[("warm", beams)] / times[("free 2", beams)], "goal": "<= 2", "command": CMD})
    return rows + [meter_row]
