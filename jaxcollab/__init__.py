"""jaxcollab: add knowledge to a Llama 3 model in rounds, in JAX, and measure what each strategy keeps."""

__version__ = "0.1.0"
