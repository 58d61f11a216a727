"""The commands' tests use the trait tests' fixtures: a trait file, an OpenAI-compatible fake, the CLI runner."""

from traits.conftest import cli, fake_openai, hash_judge, small_trait, trait_file  # noqa: F401
