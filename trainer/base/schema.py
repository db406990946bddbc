"""The shard schemas between jobs (mosaicml-streaming MDS column encodings; raw arrays, never pickles)
and the names of the files that pass between jobs.

Text shards (prep job -> autoencoder job, encode job):  <out_dir>/<split>/index.json (+ shards)
Latent shards (encode job -> diffusion job):            <out_dir>/<split>/index.json (+ shards, or one
                                                        sub-folder per partition), <split>/latent_stats.json,
                                                        <out_dir>/latent_stats.json (the train split's),
                                                        <out_dir>/_encode_config.json (what made them)
A label a record does not have is the empty string. Consumers of text shards read TEXT_COLUMNS;
the prep job writes PREP_COLUMNS (those plus where a record sits in its poem).
"""
# Files that pass between jobs
LATENT_STATS = "latent_stats.json"        # per-channel and overall mean/std and sigma_data of stored latents
ENCODE_RECORD = "_encode_config.json"     # the encode job's config (prompt encoder, prompt mode), beside its shards
TRAIN_SUMMARY = "train_summary.json"      # every training job's final figures, in its out_dir
METRICS_FILE = "metrics.jsonl"            # train loss and eval rows of a training run, in its out_dir
# Between the sbatch script (launch/backends.py) and a training job: the script writes the file named by
# STOP_FILE_ENV on the warning signal; the job checkpoints and exits REQUEUE_EXIT, which the script
# turns into `scontrol requeue` (EX_TEMPFAIL).
STOP_FILE_ENV = "LATENTVERSE_STOP_FILE"
REQUEUE_EXIT = 75

LABELS = ("title", "author", "form", "topic", "meter")

TEXT_COLUMNS = {
    "id": "str",          # stable id: source + hash of the normalised text (+ -p<piece> for a piece)
    "text": "str",        # the poem, line breaks kept
    "prompt": "str",      # built from the labels by the prep job's template ('' when no labels)
    "source": "str",      # gutenberg | shakespeare | ogura | folder | jsonl | csv | wds
    **{k: "str" for k in LABELS},
    "n_tokens": "int32",  # length in the prep job's counting tokenizer
}

# A poem longer than the prep job's clean.max_tokens is cut into pieces (at stanza, else line, else
# word boundaries), one record each: ''.join(text + piece_sep over its pieces in order) is the poem.
PIECE_COLUMNS = {
    "poem_id": "str",     # the id of the whole poem (= id when the poem is one piece)
    "piece": "int32",     # this piece's place in the poem, from 0
    "pieces": "int32",    # how many pieces the poem has (1: the whole poem)
    "piece_sep": "str",   # what followed this piece in the poem: "\n\n", "\n", " ", or "" after the last
}
PREP_COLUMNS = {**TEXT_COLUMNS, **PIECE_COLUMNS}

SPLITS = ("train", "val", "test")


def latent_columns(latent_shape, prompt_shape=None, pooled_dim=None) -> dict:
    """Latent shard columns: fp16 latent, fp16 prompt embedding (padded tokens + length, or pooled)."""
    cols = {
        "id": "str",
        "text": "str",
        "prompt": "str",
        "source": "str",
        **{k: "str" for k in LABELS},
        "latent": f"ndarray:float16:{','.join(map(str, latent_shape))}",
    }
    if prompt_shape is not None:
        cols["prompt_emb"] = f"ndarray:float16:{','.join(map(str, prompt_shape))}"
        cols["prompt_len"] = "int32"
    if pooled_dim is not None:
        cols["prompt_pooled"] = f"ndarray:float16:{pooled_dim}"
    return cols

# A finished sharded dataset (prep, encode): written last, so its presence means every shard is complete.
DONE = "_done.json"
