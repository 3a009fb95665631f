"""MkDocs hook: serve benchmarks/results/*.json beside the pages that link to them.

The pages link to result files as ``../benchmarks/results/NAME.json``, which resolves in the
repository; this registers each file under that name, so the strict build checks those links
and copies the files to ``site/benchmarks/results/``, where the same links resolve.
"""

from pathlib import Path

from mkdocs.structure.files import File, InclusionLevel


def on_files(files, config):
    root = Path(config["config_file_path"]).parent
    for path in sorted((root / "benchmarks" / "results").glob("*.json")):
        uri = path.relative_to(root).as_posix()
        files.append(
            File(
                f"../{uri}",
                config["docs_dir"],
                config["site_dir"],
                config["use_directory_urls"],
                dest_uri=uri,
                inclusion=InclusionLevel.INCLUDED,
            )
        )
    return files
