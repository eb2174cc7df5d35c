"""Model: a trained method as something to predict with. `bundle` saves and loads a method as a folder that loads
without executing code (`transferlab.load`); `predict` applies it to files and folders; `export` writes backbone
+ head as one ONNX graph.
"""
