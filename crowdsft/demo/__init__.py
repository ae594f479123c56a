"""The demo and the experiment commands: a coordinator, node processes and LLM rounds end to
end, on a seeded synthetic crowd. An application; the product never imports it (the CLI loads
it lazily)."""
