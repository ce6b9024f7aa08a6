"""U-Net++ (Zhou et al. 2018), binary nuclei vs background on CoNSeP: stage 1 of the two-stage enhancement
protocol (seed 003; see dualunet_jax/refinement.py).

    python -m dualunet_jax.train --config=configs/unetpp_consep.py --workdir=workdirs/unetpp_consep \
        --config.dataset.manual_dir=.data/CoNSeP
    python -m dualunet_jax.eval --config=configs/unetpp_consep.py --workdir=workdirs/unetpp_consep --split=test

Zhou et al.'s VGG-style variant: base 32 (32..512 channels, 9.0 M parameters), no deep supervision (their
default; `--config.model.deep_supervision=True` averages 4 heads). Optimisation and data as
configs/unet_consep.py.
"""

from configs import unet_consep


def get_config():
  config = unet_consep.binary_consep('unetpp')
  config.model.base_channels = 32
  config.model.deep_supervision = False
  return config
