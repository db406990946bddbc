"""`latentverse evaluate` on a tiny pipeline and real latent shards: every section of the report is
there, within its range, and the PNG panel is drawn; an autoencoder evaluation routes by task."""
import json
import os

import numpy as np
import pytest

from data_prep import encode_job
from trainer.base import config as C
from trainer.evaluation.generation import frechet, spread

from .conftest import run_cli
from .test_encode_job import write_text_shards
from .tiny import tiny_autoencoder, tiny_denoiser


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from trainer.models.text_encoders import PromptEncoderConfig
    from trainer.pipeline.pipeline import PipelineConfig, export_pipeline

    root = tmp_path_factory.mktemp("evalgen")
    text = write_text_shards(root / "text", n_train=48, n_val=24, meters=("iambic trimeter", "trochaic trimeter"))
    ae = tiny_autoencoder(str(root / "ae"), lexicon=True)
    encode_job.run(C.load(encode_job.EncodeConfig, None, [
        f"out_dir={root / 'lat'}", f"autoencoder={ae}", f"data.path={text}", "data.splits=[train, val]",
        "prompt_encoder.max_length=12"]))
    pcfg = PipelineConfig()
    pcfg.decode.max_length = 10
    pipe = export_pipeline(str(root / "pipe"), ae, tiny_denoiser(str(root / "den")), PromptEncoderConfig(max_length=12),
                           pcfg)
    return {"root": root, "pipe": pipe, "lat": str(root / "lat"), "text": text, "ae": ae}


# What both evaluations share: the held-out set, the prompts, samples per prompt, the labels and PCA size.
COMMON = ["held_out_split=val", "samples_per_prompt=3", "n_prompts=2", "labels=[form, meter]", "pca_dims=4",
          "n_label_values=3"]


@pytest.fixture(scope="module")
def pipeline_eval(setup):
    out = setup["root"] / "eval"
    r = run_cli("evaluate", "task=generation", f"out_dir={out}", f"pipeline={setup['pipe']}",
                f"latent_data={setup['lat']}", "steps=3", *COMMON)
    return r, out


def test_generation_report(setup, pipeline_eval):
    r, out = pipeline_eval
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["samples"]) == 6
    # the pipeline's model card now carries the figures; the sections the export wrote stay
    card = open(os.path.join(setup["pipe"], "README.md")).read()
    assert f"| frechet.generated_vs_real | {rep['frechet']['generated_vs_real']:.4g} |" in card
    assert "No evaluation report yet" not in card and card.count("## Evaluation") == 1 and "## Parts and sizes" in card
    # Each figure is the metric of the sets it names (the metrics' known answers: test_metrics.py and the
    # next test): recomputed here from the report's samples and the shards' poems, cut as the encoder reads.
    from trainer.evaluation import metrics as M
    from trainer.evaluation.samples import read_latent_split
    from trainer.models.autoencoder import LatentAutoencoder

    poems = [s["poem"] for s in rep["samples"]]
    train, held = read_latent_split(setup["lat"], "train", 20000), read_latent_split(setup["lat"], "val", 400)
    held_txt = LatentAutoencoder.from_pretrained(setup["ae"]).clip_texts(held["text"])
    fr, features = rep["frechet"], M.PCAFeatures(train["latent"], 4)
    assert fr["real_vs_real"] == pytest.approx(M.frechet_distance(features(spread(train["latent"], 6)), features(spread(held["latent"], 6))))
    assert fr["generated_vs_real"] > 0 and fr["ratio"] == pytest.approx(fr["generated_vs_real"] / fr["real_vs_real"])
    for n in (1, 2, 3, 4):
        assert rep["distinct"][f"distinct_{n}"] == {"generated": M.distinct_n(poems, n), "real": M.distinct_n(spread(held_txt, 6), n)}
    train_grams = M.ngram_set(train["text"], 4)
    assert rep["memorisation_4gram"] == {"generated": M.memorisation(poems, train_grams),
                                         "held_out": M.memorisation(held_txt, train_grams)}
    assert rep["word_validity"]["held_out"] == 1.0          # held-out poems use the training words only
    form = rep["adherence"]["form"]
    assert form["chance"] == pytest.approx(1 / 3) and set(form["per_value"]) == {"sonnet", "tanka", "haiku"}
    # each value's figures are shares of its 3 samples (or draws); the label's figure is their mean
    for key, figures in (("accuracy", form), ("conditional_gaussian_accuracy", form), ("text_accuracy", form["text"])):
        per = [d[key] for d in form["per_value"].values()]
        assert all(round(3 * f, 9) in (0, 1, 2, 3) for f in per), (key, per)
        assert figures[key.removeprefix("text_")] == pytest.approx(np.mean(per)), key
    # The real poems' reference weighs the values alike, as the samples' accuracy does: the mean of the
    # per-value accuracies of the held-out poems of each value (the plain one weighs them by their shares).
    real = [d for d in form["per_value"].values() if "real_held_out_accuracy" in d]
    assert real and all(d["n_real_held_out"] > 0 for d in real)
    n = sum(d["n_real_held_out"] for d in real)
    assert 3 <= n <= 24
    assert form["real_held_out_balanced_accuracy"] == pytest.approx(np.mean([d["real_held_out_accuracy"] for d in real]))
    assert form["text"]["real_held_out_balanced_accuracy"] == pytest.approx(
        np.mean([d["real_held_out_text_accuracy"] for d in real]))
    assert form["real_held_out_accuracy"] == pytest.approx(
        sum(d["real_held_out_accuracy"] * d["n_real_held_out"] for d in real) / n)
    assert form["text"]["real_held_out_accuracy"] == pytest.approx(    # (forms here are drawn apart from the text)
        sum(d["real_held_out_text_accuracy"] * d["n_real_held_out"] for d in real) / n)
    assert "real held-out" in r.stdout
    assert "label-conditional Gaussian" in r.stdout   # what a model that learnt only the form's mean latent reaches
    # The meter prompts ("sonnet in iambic trimeter") get the best-scanning of the pipeline's 32 readings:
    # they scan at least as well as the greedy readings, which are reported beside. Each figure is recomputed
    # from the readings the report keeps: the scansion, and the text classifier retrained as the job trains it.
    from trainer.text.prosody import scansion

    assert rep["decode_meter_readings"] == 32
    meter = rep["adherence"]["meter"]
    assert set(meter["per_value"]) == {"iambic trimeter", "trochaic trimeter"}
    values = M.most_common(train["meter"], 3)
    rows = [i for i, v in enumerate(train["meter"]) if v in values]
    train_txt = LatentAutoencoder.from_pretrained(setup["ae"]).clip_texts(train["text"])
    text_clf = M.TextLabelClassifier([train_txt[i] for i in rows], [train["meter"][i] for i in rows], seed=0)
    share = lambda texts, v: float(np.mean([p == v for p in text_clf.predict(texts)]))
    for v, d in meter["per_value"].items():
        read = {k: [row[k] for row in d["samples"]] for k in ("poem", "greedy", "free", "free_greedy")}
        assert " in " + v in d["prompt"] and all(len(x) == 3 for x in read.values()), d
        assert d["scansion"] == pytest.approx(np.mean([scansion(t, v) for t in read["poem"]]))
        assert d["scansion_greedy"] == pytest.approx(np.mean([scansion(t, v) for t in read["greedy"]]))
        assert d["scansion_greedy"] <= d["scansion"], d         # the best of 32 readings, the greedy one among them
        assert d["real_held_out_scansion"] == pytest.approx(
            np.mean([scansion(t, v) for t, y in zip(held_txt, held["meter"]) if y == v]))
        for key, texts in (("text_accuracy", "poem"), ("text_accuracy_greedy", "greedy"),
                           ("text_accuracy_free", "free"), ("text_accuracy_free_greedy", "free_greedy")):
            assert d[key] == share(read[texts], v), (v, key)
    assert sum(d["scansion"] for d in meter["per_value"].values()) > sum(d["scansion_greedy"] for d in meter["per_value"].values())
    for key, per in (("accuracy_greedy", "text_accuracy_greedy"), ("accuracy_free_greedy", "text_accuracy_free_greedy")):
        assert meter["text"][key] == pytest.approx(np.mean([d[per] for d in meter["per_value"].values()])), key
    # the report's samples keep every reading; the word validities are those of the readings they name
    assert [s["greedy"] for s in rep["samples"]] != poems       # a meter prompt among them: read 32 ways
    vocab = M.vocabulary(train["text"])
    for key, field in (("generated_greedy", "greedy"), ("generated_free", "free"), ("generated_free_greedy", "free_greedy")):
        assert rep["word_validity"][key] == M.word_validity([s[field] for s in rep["samples"]], vocab), key
    assert "greedy reading" in r.stdout
    # MAUVE of the samples against as many held-out poems over the MiniLM sentence features (mauve-text is
    # locked: a number, never the "not importable" note)
    from trainer.models.text_encoders import PromptEncoderConfig, build_prompt_encoder

    minilm = build_prompt_encoder(PromptEncoderConfig(max_length=128))
    assert isinstance(rep["mauve"], float) and 0 < rep["mauve"] <= 1
    assert rep["mauve"] == pytest.approx(M.mauve_score(minilm(poems)[2].numpy(), minilm(spread(held_txt, 6))[2].numpy()))
    lin = rep["denoiser_vs_linear"]
    assert set(lin) == {"0.2", "0.4", "0.8", "1.5"}
    for s, v in lin.items():
        assert abs(v["noisy"] / float(s) ** 2 - 1) < 0.1 and v["denoiser"] > 0 and v["linear"] > 0
    assert lin["1.5"]["linear"] < lin["1.5"]["noisy"]          # the Wiener filter removes noise
    # The autoencoder has a lexicon, so the samples and the Gaussian draws (the baseline the samples have
    # to beat) spell its words; what the decoder spells freely is reported beside (this untrained one: nothing at all).
    wv = rep["word_validity"]
    assert rep["decode_lexicon"] is True and wv["generated"] == 1.0 == wv["gaussian_draws"] and wv["generated_free"] < 1.0
    assert wv["generated"] == M.word_validity(poems, M.vocabulary(train["text"]))
    assert form["text"]["accuracy_free"] == pytest.approx(np.mean([d["text_accuracy_free"] for d in form["per_value"].values()]))
    assert "spelling freely" in r.stdout
    assert os.path.getsize(out / "generation_panel.png") > 10000


def key_paths(d, prefix="") -> set[str]:
    """The report's keys as dotted paths, down through the mappings (a list counts as one leaf)."""
    if not isinstance(d, dict):
        return set()
    return set().union(*({prefix + k} | key_paths(v, prefix + k + ".") for k, v in d.items()))


def test_token_lm_baseline_is_scored_by_the_same_evaluation(setup, pipeline_eval, tmp_path):
    """A token LM (the autoregressive baseline) in place of the pipeline: the same prompts, the same report
    keys, and each figure recomputed from its samples, its poems encoded by the latents' autoencoder."""
    from trainer.evaluation import metrics as M
    from trainer.evaluation.samples import read_latent_split
    from trainer.models.autoencoder import LatentAutoencoder
    from trainer.models.poem_lm import PoemLM, PoemLMSettings, save_poem_lm
    from trainer.models.token_latents import TokenLatentConfig, build_causal_lm
    from trainer.models.tokenizers import train_bpe

    from .tiny import WORDS

    import torch

    tok = train_bpe([" ".join(WORDS)] * 5, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    lm_dir = save_poem_lm(str(tmp_path / "poem_lm"), build_causal_lm(TokenLatentConfig(hidden_size=32), tok), tok,
                          PoemLMSettings(seq_len=12))
    out = tmp_path / "eval"
    # no autoencoder given: the one the encode job names in latent_data/_encode_config.json
    r = run_cli("evaluate", "task=generation", f"out_dir={out}", "pipeline=null", f"token_lm={lm_dir}",
                f"latent_data={setup['lat']}", "temperature=0.9", "top_p=0.8", *COMMON)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    pipe_rep = json.loads((pipeline_eval[1] / "report.json").read_text())
    # the same table: every key of the pipeline's report, and no other (no denoiser: its check is null)
    assert rep["denoiser_vs_linear"] is None and pipe_rep["denoiser_vs_linear"]
    assert key_paths(rep) == key_paths(pipe_rep) - {p for p in key_paths(pipe_rep) if p.startswith("denoiser_vs_linear.")}
    assert rep["pipeline"] is None and rep["token_lm"] == lm_dir and pipe_rep["token_lm"] is None
    assert [s["prompt"] for s in rep["samples"]] == [s["prompt"] for s in pipe_rep["samples"]]   # the same prompts

    # the samples are the LM's, seeded, cut to the tokens the autoencoder reads as the references are
    ae = LatentAutoencoder.from_pretrained(setup["ae"])
    prompts = list(dict.fromkeys(s["prompt"] for s in rep["samples"]))
    poems = ae.clip_texts(PoemLM.from_pretrained(lm_dir)(prompts, 3, temperature=0.9, top_p=0.8, seed=0))
    assert [s["poem"] for s in rep["samples"]] == poems and len(poems) == 6
    # the Fréchet distance of their latents, encoded by the autoencoder of the held-out latents
    train, held = read_latent_split(setup["lat"], "train", 20000), read_latent_split(setup["lat"], "val", 400)
    features = M.PCAFeatures(train["latent"], 4)
    fr = rep["frechet"]
    assert fr["generated_vs_real"] == pytest.approx(M.frechet_distance(features(ae.encode(poems).numpy()),
                                                                       features(spread(held["latent"], 6))), rel=1e-4)
    assert fr["real_vs_real"] == pipe_rep["frechet"]["real_vs_real"]
    held_txt = ae.clip_texts(held["text"])
    for n in (1, 2, 3, 4):
        assert rep["distinct"][f"distinct_{n}"] == {"generated": M.distinct_n(poems, n), "real": M.distinct_n(spread(held_txt, 6), n)}
    train_grams = M.ngram_set(train["text"], 4)
    assert rep["memorisation_4gram"] == {"generated": M.memorisation(poems, train_grams),
                                         "held_out": M.memorisation(held_txt, train_grams)}
    # it spells freely and is read once: its free and greedy figures are its own
    wv = rep["word_validity"]
    assert wv["generated"] == M.word_validity(poems, M.vocabulary(train["text"])) == wv["generated_free"] == wv["generated_greedy"]
    assert rep["decode_lexicon"] is False and rep["decode_meter_readings"] == 1
    assert rep["mauve"] == rep["mauve_free"] == rep["mauve_greedy"] and isinstance(rep["mauve"], float)
    # the Gaussian baseline is the autoencoder's, decoded as the pipeline decodes it (with its lexicon)
    assert wv["gaussian_draws"] == 1.0 and wv["held_out"] == pipe_rep["word_validity"]["held_out"]
    form = rep["adherence"]["form"]
    assert [d["prompt"] for d in form["per_value"].values()] == [d["prompt"] for d in pipe_rep["adherence"]["form"]["per_value"].values()]
    assert form["text"]["accuracy_free"] == form["text"]["accuracy"] and form["real_held_out_accuracy"] == pipe_rep["adherence"]["form"]["real_held_out_accuracy"]
    assert os.path.getsize(out / "generation_panel.png") > 10000


@pytest.mark.parametrize("override,message", [("", "pipeline, token_lm: give one of them"),
                                              ("pipeline=null", "pipeline, token_lm: give one of them"),
                                              ("token_lm=. pipeline=null steps=3", "steps: only with pipeline"),
                                              ("temperature=0.5", "temperature: only with token_lm"),
                                              ("token_lm=. pipeline=null top_p=1.5", "top_p: must be in (0, 1]")])
def test_token_lm_settings_are_one_line_before_any_work(tmp_path, override, message):
    out = tmp_path / "eval"
    extra = ["token_lm=."] if override == "" else []
    r = run_cli("evaluate", "task=generation", f"out_dir={out}", "pipeline=.", *extra, *override.split())
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not out.exists()


def test_token_lm_yaml_loads(tmp_path):
    from trainer.jobs.evaluate_generation import EvalGenerationConfig

    cfg = C.load(EvalGenerationConfig, "yamls/eval/generation_token_lm.yaml", [f"token_lm={tmp_path}",
                                                                               f"latent_data={tmp_path}"])
    assert cfg.pipeline is None and cfg.token_lm == str(tmp_path) and cfg.samples_per_prompt == 32
    assert cfg.held_out_split == "test" and cfg.autoencoder is None


def test_metric_families_give_known_answers_on_constructed_inputs():
    """trainer/evaluation/generation.py's families on inputs whose answers are known."""
    from trainer.evaluation import generation as G
    from trainer.evaluation.metrics import PCAFeatures, vocabulary

    rng = np.random.default_rng(0)
    scale = np.linspace(3, 0.5, 16).reshape(1, 2, 8)        # a few dominant directions for the PCA
    train, held = rng.normal(size=(200, 2, 8)) * scale, rng.normal(size=(100, 2, 8)) * scale
    # the samples are the training latents the real baseline uses: ratio 1; the held-out ones themselves: 0
    fr = G.frechet(train, held, G.spread(train, 50), pca_dims=4)
    assert fr["ratio"] == pytest.approx(1.0) and fr["n"] == 50 and fr["pca_dims"] == 4
    assert G.frechet(train, held, G.spread(held, 50), pca_dims=4)["generated_vs_real"] == pytest.approx(0, abs=1e-9)
    # held-out latents moved by 2 along the top principal direction: the distance is 2^2 = 4
    top = PCAFeatures(train, 4).components[0].reshape(2, 8)
    assert G.frechet(train, held, G.spread(held, 50) + 2 * top, pca_dims=4)["generated_vs_real"] == pytest.approx(4.0, rel=1e-6)

    corpus = ["the sea is old and grey\nthe wind sings all day", "a moon above the stone\nthe night walks home alone",
              "love is a river of light\nit runs through the dark night"]
    d = G.distinct(corpus[:1] * 5, corpus)                  # one poem five times: each n-gram 5 times
    assert [d[f"distinct_{n}"]["generated"] for n in (1, 2, 3, 4)] == [10 / 55, 0.2, 0.2, 0.2]   # "the" twice in it
    assert [d[f"distinct_{n}"]["real"] for n in (2, 3, 4)] == [1.0, 1.0, 1.0]
    other = ["green leaves in the spring\nthe children dance and sing"]
    assert G.memorisation_4gram(corpus[1:], other, corpus) == {"generated": 1.0, "held_out": 0.0}
    letters = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 7)) for _ in range(40)]
    wv = G.word_validity(vocabulary(corpus), copied=corpus, letters=[" ".join(letters)])
    assert wv == {"copied": 1.0, "letters": 0.0}


def test_autoencoder_task_routes(setup, tmp_path):
    r = run_cli("evaluate", "task=autoencoder", f"autoencoder_dir={setup['ae']}", f"data_path={setup['text']}",
                "split=val", "n_samples=8", f"out_dir={tmp_path / 'ae'}")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "ae" / "report.json").read_text())
    # the figures of the autoencoder evaluation on the first 8 poems of the split asked for
    from trainer.data.mds import read_texts
    from trainer.evaluation.autoencoder import FIGURES, evaluate_autoencoder

    texts = read_texts(os.path.join(setup["text"], "val"), "text", 8)
    assert texts != read_texts(os.path.join(setup["text"], "train"), "text", 8)
    direct = evaluate_autoencoder(setup["ae"], texts)
    assert rep["n"] == 8 and {k: rep[k] for k in FIGURES} == {k: direct[k] for k in FIGURES}
    assert rep["shuffled"] == direct["shuffled"] and rep["examples"] == direct["examples"]


def test_unknown_task_is_one_line(tmp_path):
    r = run_cli("evaluate", "task=poetry", f"out_dir={tmp_path}")
    assert r.returncode == 2 and r.stderr.strip().startswith("command line: task: expected one of")


def test_generation_eval_samples_with_its_own_steps_and_churn(setup):
    import torch

    from trainer.evaluation.samples import Sampling, generate
    from trainer.jobs.evaluate_generation import EvalGenerationConfig
    from trainer.pipeline.pipeline import Pipeline

    def _generate(pipe, prompts, cfg):
        s = generate(pipe, prompts, Sampling.of(cfg))
        return s.x, s.latents, s.poems, s.greedy

    pipe = Pipeline.from_pretrained(setup["pipe"])
    x, lat, txt, greedy = _generate(pipe, ["sonnet"], EvalGenerationConfig(samples_per_prompt=2, steps=3, churn=40.0))
    ref, _ = pipe.sample_latents(["sonnet"], 2, steps=3, churn=40.0)
    assert torch.equal(x, ref) and lat.shape == (2, 32, 64) and len(txt) == 2
    assert greedy is txt                                    # no meter named: only the greedy reading
    plain, *_ = _generate(pipe, ["sonnet"], EvalGenerationConfig(samples_per_prompt=2, steps=3))
    assert not torch.equal(plain, x)


@pytest.mark.parametrize("override,message", [("churn=-1", "churn: must be >= 0, got -1.0"),
                                              ("steps=0", "steps: must be >= 1, got 0"),
                                              ("sampler=ddpm churn=1", "churn: only with sampler heun"),
                                              ("meter_readings=0", "meter_readings: must be >= 1, got 0")])
def test_bad_sampler_overrides_are_one_line_before_any_work(tmp_path, override, message):
    out = tmp_path / "eval"
    r = run_cli("evaluate", "task=generation", f"out_dir={out}", *override.split())
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr
    assert not out.exists()


def test_generation_eval_of_a_whitened_pipeline(setup, tmp_path):
    """A pipeline trained with data.normalize=whiten (its whitening read from the pipeline folder) goes through
    the generation evaluation, the Gaussian and the denoiser-vs-linear check in its whitened space included.
    (48 latents of 2,048 numbers: the whitening's floor holds most directions, where held-out latents are
    large and the Gaussian's Wiener filter does worse than the noisy input; no ordering is asserted.)"""
    import torch

    from streaming import StreamingDataset

    from trainer.data.whitening import Whitening
    from trainer.models.text_encoders import PromptEncoderConfig
    from trainer.pipeline.export import load_denoiser, save_denoiser
    from trainer.pipeline.pipeline import Pipeline, export_pipeline

    ds = StreamingDataset(local=os.path.join(setup["lat"], "train"), shuffle=False, batch_size=1)
    whitening = Whitening.fit(torch.tensor(np.stack([ds[i]["latent"] for i in range(len(ds))]), dtype=torch.float32))
    net, meta = load_denoiser(tiny_denoiser(str(tmp_path / "den0")))
    net.sigma_data = 1.0
    save_denoiser(str(tmp_path / "den"), net, meta["denoiser_config"], meta["latent_stats"], "whiten", whitening=whitening)
    pipe = export_pipeline(str(tmp_path / "pipe"), setup["ae"], str(tmp_path / "den"), PromptEncoderConfig(max_length=12))
    assert torch.equal(Pipeline.from_pretrained(pipe).normalizer.whitening.whiten, whitening.whiten)
    out = tmp_path / "eval"
    r = run_cli("evaluate", "task=generation", f"out_dir={out}", f"pipeline={pipe}", f"latent_data={setup['lat']}",
                "steps=2", "mauve=false", *COMMON)
    assert r.returncode == 0, r.stderr[-3000:]
    lin = json.loads((out / "report.json").read_text())["denoiser_vs_linear"]
    assert set(lin) == {"0.2", "0.4", "0.8", "1.5"}
    assert all(np.isfinite(v[k]) and v[k] > 0 for v in lin.values() for k in ("denoiser", "linear", "noisy")), lin
    assert all(v["noisy"] == pytest.approx(float(s) ** 2, rel=0.1) for s, v in lin.items()), lin   # noise of sigma


def test_frechet_compares_sets_spread_over_splits_written_form_after_form():
    """The encode job writes a split's partitions one after another (form=sonnet, then stanza, ...): the
    held-out and training sets the Fréchet figures compare must each cover every form, not the first or
    last rows (which compared one form with another, and made real-vs-real large and every ratio small)."""
    from trainer.evaluation import metrics as M

    g = np.random.default_rng(0)
    def split(n):   # two forms, far apart, the first half one, the second the other
        return np.concatenate([g.normal(0, 1, (n // 2, 2, 3)), g.normal(4, 1, (n // 2, 2, 3))]).astype(np.float32)
    train, held = split(400), split(200)
    generated = split(40)                       # samples of both forms
    fr = frechet(train, held, generated, pca_dims=4)
    features = M.PCAFeatures(train, 4)
    one_form_vs_other = M.frechet_distance(features(train[-40:]), features(held[:40]))
    assert fr["real_vs_real"] < 0.1 * one_form_vs_other, (fr, one_form_vs_other)
    assert 0.2 < fr["ratio"] < 5, fr             # the samples are as real as the training latents
    assert spread(list(range(10)), 4) == [0, 3, 6, 9] and spread([1, 2], 5) == [1, 2]


def test_levers_frechet_mode_is_the_evaluations_figure_without_decoding(setup, pipeline_eval):
    """bench.denoiser_levers --frechet: at the pipeline's own guidance, the same samples and so the same Fréchet
    ratio as the evaluation's report; another guidance scale gives other samples."""
    from bench.denoiser_levers import frechet_over_guidance
    from launch.cli import load_config, load_job_module

    r, out = pipeline_eval
    assert r.returncode == 0, r.stderr[-3000:]
    want = json.loads((out / "report.json").read_text())["frechet"]["ratio"]
    cfg = load_config(load_job_module("evaluate"), None, ["task=generation", f"pipeline={setup['pipe']}",
                                                          f"latent_data={setup['lat']}", "steps=3", *COMMON])
    got = frechet_over_guidance(cfg, [None, 1.0])
    own = [v for k, v in got.items() if k.endswith("(own)")]
    assert own == [pytest.approx(want, rel=1e-9)], (got, want)
    assert got["1"] != pytest.approx(want, rel=1e-3) and got["Gaussian draws"] > 0, got
