"""Import check: every required library imports in this environment (run at install time and in tests)."""
import importlib
import sys

REQUIRED = ["torch", "composer", "streaming", "open_clip", "transformers", "diffusers", "deepspeed", "webdataset",
            "wandb", "mlflow"]


def check(modules=REQUIRED) -> dict[str, str]:
    """Import each module; return {name: version}. Raises ImportError naming the first that fails."""
    import trainer  # noqa: F401  (offline defaults before anything touches the hub)

    versions = {}
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # a broken install shows up as many exception types
            raise ImportError(f"{name}: does not import: {type(e).__name__}: {e}") from e
        versions[name] = getattr(mod, "__version__", "?")
    return versions


def main() -> int:
    try:
        versions = check()
    except ImportError as e:
        print(f"import check failed: {e}", file=sys.stderr)
        return 1
    print("import check ok: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
