"""The latent encoders as diffusers models: saved with `save_pretrained`, loaded with `from_pretrained`.

    ae.save_pretrained("out/ae")                      # <config_name> + diffusion_pytorch_model.safetensors + tokenizer
    ae = LatentAutoencoder.from_pretrained("out/ae")  # diffusers' ModelMixin.from_pretrained, then the tokenizer

A `TextLatentModel` is a diffusers ModelMixin + ConfigMixin: its constructor's JSON arguments are its
config file, its weights diffusers' safetensors file, both read by diffusers' own from_pretrained. What
diffusers does not know about, this class adds around it:
- the tokenizer (transformers' files in the same folder), attached after the weights load: a tokenizer
  is not a constructor argument diffusers can write into a config;
- tied weights (BART's shared embeddings, a tied LM head): safetensors refuses two names for one
  tensor, so the file holds each tied group once (under its first name) and the other names are
  filled back from it when diffusers reads the file;
- a temporary folder renamed into place, so an interrupted save leaves the old folder whole;
- folders written before this format (`_class_name` missing from the config) go to `_from_legacy`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

from diffusers import ConfigMixin, ModelMixin

from trainer.base.config import UserError
from trainer.base.files import replace_dir


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def check_weights_file(file: str) -> None:
    """A one-line error naming a safetensors file that is missing, truncated or garbled."""
    from safetensors import safe_open
    try:
        with safe_open(file, framework="pt"):
            pass
    except Exception as e:  # safetensors raises its own error types
        raise UserError(f"{file}: cannot read the weights ({_first_line(e)})") from None


class TextLatentModel(ModelMixin, ConfigMixin):
    """Base of LatentAutoencoder and TokenEmbeddingLatents; subclasses set `config_name`, call
    `register_to_config(...)` with their constructor's JSON arguments, and implement `attach_tokenizer`
    and `_from_legacy` (the format before this one)."""

    ignore_for_config = ["tokenizer"]
    what = "a latent model"   # in the one-line refusal of a folder that is not one

    def attach_tokenizer(self, tokenizer) -> None:
        raise NotImplementedError

    @classmethod
    def read_tokenizer(cls, path: str):
        from trainer.models.tokenizers import load_tokenizer
        return load_tokenizer(path)

    def _save_extra(self, path: str) -> None:
        """Files of the folder besides config, weights and tokenizer (the lexicon)."""

    def _load_extra(self, path: str) -> None:
        pass

    # ---- tied weights: one name per tensor in the file

    def _tied_aliases(self) -> dict[str, str]:
        """{alias: kept name} for state-dict entries that are the same tensor as an earlier entry."""
        first: dict[int, str] = {}
        out = {}
        for name, t in self.state_dict(keep_vars=True).items():
            key = id(t)
            if key in first:
                out[name] = first[key]
            else:
                first[key] = name
        return out

    @contextlib.contextmanager
    def _aliases_left_out(self):
        aliases = self._tied_aliases()

        def drop(module, state_dict, prefix, local_metadata):
            for a in aliases:
                state_dict.pop(prefix + a, None)
        handle = self.register_state_dict_post_hook(drop)
        try:
            yield
        finally:
            handle.remove()

    def _fix_state_dict_keys_on_load(self, state_dict) -> None:
        # diffusers' own hook on the state dict it read, before it compares keys: the tied names
        # the file leaves out point at the tensor it keeps.
        super()._fix_state_dict_keys_on_load(state_dict)
        self._tied_on_build = self._tied_aliases()
        for alias, kept in self._tied_on_build.items():
            if kept in state_dict and alias not in state_dict:
                state_dict[alias] = state_dict[kept]

    def _tie_again(self) -> None:
        """diffusers assigns each loaded tensor to its own Parameter: the tied names share the data
        then but are two Parameters, which a dtype cast or an optimizer would pull apart; make them
        one Parameter again, as built."""
        params = dict(self.named_parameters(remove_duplicate=False))
        for alias, kept in getattr(self, "_tied_on_build", {}).items():
            if alias in params and kept in params:
                owner, _, attr = alias.rpartition(".")
                setattr(self.get_submodule(owner), attr, params[kept])

    # ---- save / load

    def save_pretrained(self, path: str, **kwargs) -> None:
        """diffusers' save_pretrained (config + safetensors), the tokenizer and extras beside it; into a
        temporary folder, renamed into place."""
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{type(self).__name__}-", dir=parent)
        try:
            with self._aliases_left_out():
                super().save_pretrained(tmp, safe_serialization=True, **kwargs)
            self.tokenizer.save_pretrained(tmp)
            self._save_extra(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_dir(tmp, path)

    @classmethod
    def is_legacy(cls, path: str) -> bool:
        """A folder saved before the diffusers format: its config has no `_class_name`."""
        file = os.path.join(path, cls.config_name)
        try:
            with open(file) as f:
                return "_class_name" not in json.load(f)
        except (OSError, json.JSONDecodeError):
            return False   # diffusers' loader names the missing or corrupt file

    @classmethod
    def _from_legacy(cls, path: str, map_location: str = "cpu", torch_dtype=None):
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, path: str, map_location: str = "cpu", torch_dtype=None, **kwargs):
        """diffusers' ModelMixin.from_pretrained, then the tokenizer and extras from the same folder.
        `map_location`: the device the model ends on; other keywords go to diffusers (the pipeline
        loader passes its own)."""
        path = os.fspath(path)
        if not os.path.isfile(os.path.join(path, cls.config_name)):
            raise UserError(f"{path}: not {cls.what} folder (no {cls.config_name})")
        if cls.is_legacy(path):
            return cls._from_legacy(path, map_location=map_location, torch_dtype=torch_dtype)
        from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
        check_weights_file(os.path.join(path, SAFETENSORS_WEIGHTS_NAME))
        # Built on a real device, not on accelerate's meta one: the tied names must be one tensor.
        kwargs["low_cpu_mem_usage"] = False
        try:
            model, info = super().from_pretrained(path, torch_dtype=torch_dtype, output_loading_info=True, **kwargs)
        except UserError:
            raise
        except Exception as e:  # diffusers / safetensors raise many kinds for a damaged folder
            raise UserError(f"{path}: cannot load {cls.__name__}: {_first_line(e)}") from None
        if info["missing_keys"] or info["mismatched_keys"]:
            raise UserError(f"{path}: the weights do not match {cls.config_name}: missing "
                            f"{sorted(info['missing_keys'])[:3]}, mismatched {info['mismatched_keys'][:3]}")
        model._tie_again()
        model.attach_tokenizer(cls.read_tokenizer(path))
        model._load_extra(path)
        return model.to(map_location).eval()
