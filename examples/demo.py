"""Demo: print the freeze plan of a built-in ResNet-56 (the runtime demo replaces this)."""

import fxfreeze
from fxfreeze import zoo

if __name__ == "__main__":
    model = zoo.resnet56()
    print(fxfreeze.plan(model, zoo.example_inputs("resnet56")).table())
