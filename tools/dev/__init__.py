"""Dev tools, run from the repository root as `python -m tools.dev.NAME`: the fixture makers of tests/fixtures
and the toy model's trainer and checker (these need torch and diffusers: requirements-dev.txt), and the
generator of the shipped toy-world example images."""
