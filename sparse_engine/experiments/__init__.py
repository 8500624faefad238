"""The reproduction of the paper on the built-in suite: an application built on the library.

The library (config, layers, masking, training, io, merging, serving, ...) never imports this
package; it may import anything below it.
"""
