from .onnx import main

main()
