"""The engine under ``LayerParallel``: how one rank's layers run a pass.

  stage     ``Stage``: a rank's block of layers, their parameters, the call
            plan of a pass and ``call(n, u, ctx)``; ghost copies of other
            ranks' layers for coarse-grid steps
  context   ``PassContext``: one forward pass and the backward pass through
            its result (pass index, state meta, record flag, kept graphs,
            weight gradients); ``PassRecords``: ``last_forward`` and
            ``last_backward``
  policy    the module-state policy: train/eval mode, random draws seeded
            per (pass, layer), buffers updated once per pass
  mgrit     the forward and adjoint MGRIT apps over (stage, context), the
            passes they run, and the autograd function around them
  pipeline  exact passes: schedules as lists of actions (GPipe, 1F1B, any
            registered generator) run by one interpreter
  vectors   the apps' vector operations (float64/32, bfloat16, float16) and
            how a state becomes a message
  transport how a tensor becomes a message: host-staged or device-direct
  waiting   busy or sleeping waits, chosen by how many ranks share the cores
  ghosts    the coarse-grid weights sent between ranks before a solve, only
            when they changed
  solvers   the cache of forward/adjoint solver pairs and their warm states
  options   the two solves' MGRIT options in the network's names
  gradhooks hooks called with each layer's weight gradient as soon as the
            adjoint solve's final sweep has made it; the mark of backward
            calls whose accumulations are partial sums (1F1B micro-batches)
  layers    ``LayersByIndex`` (a base of ``LayerParallel``): the local
            layers and their states by global index; the N layers gathered

Data flows down: ``layerpar.parallel`` (the facades) builds a stage, the
solvers, the ghosts and the pipeline, and hands each pass a context; the
apps and the pipeline read the stage and write into the context, never
into the facade.
"""
