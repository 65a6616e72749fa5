"""Data sets for layer-parallel training, and a rank-invariant batch iterator.

Nothing here touches the network: the built-in sets are generated (``peaks``)
or shipped with scikit-learn (``digits``); the others are read from standard
files in a directory the user names.

Public names
------------
``load_dataset(name, *, root=None, seed=0, val_fraction=None, ...)``
    Returns a :class:`Dataset`: ``train`` and ``val`` splits (and ``test`` for
    the sets that have one), each a :class:`Split` of ``inputs`` (float
    tensor, ``(n, *input_shape)``) and ``labels`` (int64 tensor, ``(n,)``),
    plus ``input_shape``, ``num_classes`` and the normalisation ``mean`` and
    ``std`` (per channel or per feature, from the training split only).
``Split.loader(batch_size=..., seed=..., need_inputs=..., need_labels=...)``
    A :class:`BatchLoader`: ``loader.epoch(e)`` yields ``(inputs, labels)``
    mini-batches in an order that depends only on ``seed``, ``e`` and the
    split size, so every rank of a layer-parallel group draws the same
    batches.  In layer-parallel training only the first rank needs inputs and
    only the last rank needs labels; a rank that does not need one of them
    gets ``None`` in its place (and can skip loading it with
    ``load_dataset(..., need_inputs=False)``).
``load_files(path, *, val_path=None, inputs="x", labels="y", ...)``
    The user's own data: an ``.npz``, HDF5 or CSV file with named input and
    label arrays (``read_arrays``; ``FILE_SUFFIXES``); validation from
    ``val_path`` or ``val_fraction`` of the file.  ``[data] name = "files"``
    with ``data.path`` in a configuration.  Inputs holding NaN or Inf are
    refused at load (as ``from_arrays`` and ``from_torch_dataset`` refuse
    them), naming the file and the array.
``from_arrays(inputs, labels, ...)``, ``from_torch_dataset(dataset, ...)``
    The same :class:`Dataset` from arrays or from any map-style
    ``torch.utils.data.Dataset`` whose items are ``(input, label)``.  In a
    Python training loop with :class:`layerpar.Network`::

        data = from_torch_dataset(ds, val_fraction=0.1, seed=0, dtype=torch.float64)
        loader = data.train.loader(batch_size=64, seed=0,
                                   need_inputs=net.is_first, need_labels=net.is_last)
        for epoch in range(epochs):
            for x, y in loader.epoch(epoch):   # the same batches on every rank
                opt.zero_grad()
                net.loss(x, y, torch.nn.functional.cross_entropy).backward()
                opt.step()

    (``data.input_shape`` and ``data.num_classes`` size the opening and
    closing modules.)
``load_configured(data_config, *, need_inputs, need_labels, comm)``
    The data set of a ``[data]`` configuration section.
``read_idx(path)``, ``read_cifar_batch(path)``, ``read_arrays(path, ...)``
    The file readers, public for tests and for user tools.
``DatasetError``
    A ``ValueError`` for an unknown name, a missing or malformed directory or
    file, or inputs that are not finite; the message names the directory and
    the files expected there, or the file and the array.

Known sets (``KNOWN_DATASETS``)
-------------------------------
``peaks``          2-D points in [-3, 3]^2, 5 classes from level sets of the
                   MATLAB ``peaks`` function (Haber & Ruthotto 2017; Guenther
                   et al., SIMODS 2020).  Default: 6000 points, 1/6 for
                   validation (5000 + 1000).
``digits``         scikit-learn's 8x8 handwritten digits (1797 images, 10
                   classes), as 1x8x8 images in [0, 1]; 20% for validation.
``mnist``, ``fashion-mnist``
                   IDX files ``train-images-idx3-ubyte``,
                   ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
                   ``t10k-labels-idx1-ubyte`` (or the same names + ``.gz``) in
                   ``root``; 1x28x28, 10 classes; 1/6 of the training file for
                   validation; the t10k files are the test split.
``cifar10``        the Python batches ``data_batch_1`` .. ``data_batch_5`` and
                   ``test_batch`` in ``root`` or in ``root/cifar-10-batches-py``;
                   3x32x32, 10 classes; 10% for validation.
``files``          the user's file (``load_files``); 20% for validation
                   unless ``val_path`` names a validation file.

Modules (each imports only those above it in this list)
-------------------------------------------------------
``containers``  ``Dataset``, ``Split``, ``BatchLoader``, ``DatasetError``
``prepare``     labels, finite inputs, the seeded split, normalisation;
                arrays -> ``Dataset``
``readers``     one format each, files in, numpy arrays out: ``generated``
                (peaks, digits), ``idx`` (mnist, fashion-mnist), ``cifar``,
                ``files`` (the user's .npz, HDF5, CSV)
``adapters``    ``from_arrays``, ``from_torch_dataset``
``loading``     ``load_dataset``, ``load_files``, ``load_configured``: which
                rank reads what, failures agreed on every rank
"""
# The constants below (not in __all__) stay importable from here, as they were
# from the single module this package replaces.
from layerpar.data.containers import BatchLoader, Dataset, DatasetError, Split
from layerpar.data.readers.generated import (PEAKS_DEFAULT_SAMPLES,  # noqa: F401
                                             PEAKS_THRESHOLDS, peaks_function)
from layerpar.data.readers.idx import MNIST_FILES, read_idx  # noqa: F401
from layerpar.data.readers.cifar import (CIFAR10_DIRNAME, CIFAR10_TEST_FILE,  # noqa: F401
                                         CIFAR10_TRAIN_FILES, read_cifar_batch)
from layerpar.data.readers.files import FILE_SUFFIXES, read_arrays
from layerpar.data.adapters import from_arrays, from_torch_dataset
from layerpar.data.loading import (DEFAULT_VAL_FRACTION, KNOWN_DATASETS, load_configured,
                                   load_dataset, load_files)

__all__ = [
    "KNOWN_DATASETS", "DEFAULT_VAL_FRACTION", "DatasetError", "Dataset", "Split", "BatchLoader",
    "load_dataset", "load_files", "load_configured", "from_arrays", "from_torch_dataset",
    "peaks_function", "read_idx", "read_cifar_batch", "read_arrays", "FILE_SUFFIXES",
]
