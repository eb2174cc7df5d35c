"""Data: the labelled images a user already has. `images` decides what counts as an image and decodes it to RGB;
`datasets` finds ImageFolder trees, class folders and CSV manifests and splits them; `demo` builds the offline
demo set.
"""
