"""The self-contained runtimes that ship inside packages (copied into a package's runtime/ folder):
numpy + onnxruntime (+ torch for the expert-parallel one). They import nothing else of this project, so a
deployment team runs them without this repository."""
