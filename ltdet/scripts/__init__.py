"""The console scripts' mains: `ltdet-train` (`ltdet.scripts.train:main`) and `ltdet-test`
(`ltdet.scripts.test:main`), declared in setup.py; tools/train.py and tools/test.py call them.
Each also runs as `python -m ltdet.scripts.train` (and so under `torchrun -m`), which is why this
package imports neither: `-m` would then find the module imported twice."""

__all__: list[str] = []
