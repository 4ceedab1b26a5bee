"""The two model families, built and trained here (serving.models loads and runs them), written in
backend-neutral Keras 3 (TensorFlow, JAX or PyTorch).

Both take the contract's input, (224, 224, 1) in [0, 1], and give one sigmoid probability of
pneumonia. Augmentation is a separate block used only while training, so saved models are pure.
"""

from __future__ import annotations

import keras
from keras import layers

from core import contract
from serving.models import backbone_of, input_layer

BACKBONES = {
    # name: (constructor, keyword arguments); all take [-1, 1] inputs.
    "mobilenet_v2": (keras.applications.MobileNetV2, {"alpha": 1.0}),
    "mobilenet_v2_0.35": (keras.applications.MobileNetV2, {"alpha": 0.35}),
    "xception": (keras.applications.Xception, {}),
}

AUGMENTATIONS = {
    "standard": (
        "rotation +-5 deg, shift +-6%, zoom -10..+15% with height and width drawn independently "
        "(aspect ratio +-15%), contrast +-40%, brightness +-10%"
    ),
    "robust": (
        "standard, plus gamma 0.67..1.5, Gaussian blur (5x5, sigma up to 1 px) on half the "
        "images, Gaussian noise sd 0.02, and one erased patch (2-8% of the image) on half the images"
    ),
}


class RandomGamma(layers.Layer):
    """x ** gamma with log(gamma) uniform in +-`log_range`, per image, for inputs in [0, 1].

    The percentile stretch removes linear exposure differences; a tone curve (how a vendor's
    processing maps dose to grey) is what remains, and gamma is its first-order model.
    """

    def __init__(self, log_range: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.log_range = log_range
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        if not training:
            return inputs
        shape = (keras.ops.shape(inputs)[0], 1, 1, 1)
        log_gamma = keras.random.uniform(
            shape, -self.log_range, self.log_range, seed=self.generator
        )
        return keras.ops.power(keras.ops.clip(inputs, 1e-6, 1.0), keras.ops.exp(log_gamma))


def build_augmentation(seed: int = 1337, recipe: str = "standard") -> keras.Sequential:
    """Small affine, contrast and brightness changes: what differs between exposures.

    Height and width zoom are drawn independently because the data set squashed every original
    (of varied size and aspect ratio) to 224x224, as serving does too: how much an image was
    squashed says something about the machine and nothing about the lungs, so the model must not
    learn it. "robust" adds what differs between sites after the percentile stretch (tone curve,
    sharpness, noise) and hides a patch, so no single region (a marker, a line) can decide alone.
    AUGMENTATIONS describes each recipe for the card.
    """
    if recipe not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {sorted(AUGMENTATIONS)}, got {recipe!r}")
    steps = [
        layers.RandomRotation(0.03, fill_mode="constant", seed=seed),
        layers.RandomTranslation(0.06, 0.06, fill_mode="constant", seed=seed),
        layers.RandomZoom((-0.1, 0.15), (-0.1, 0.15), fill_mode="constant", seed=seed),
        layers.RandomContrast(0.4, seed=seed),
        layers.RandomBrightness(0.1, value_range=(0.0, 1.0), seed=seed),
    ]
    if recipe == "robust":
        steps += [
            RandomGamma(0.4, seed=seed),
            layers.RandomGaussianBlur(
                factor=0.5, kernel_size=5, sigma=(0.1, 1.0), value_range=(0.0, 1.0), seed=seed
            ),
            layers.GaussianNoise(0.02, seed=seed),
            layers.RandomErasing(
                factor=0.5, scale=(0.02, 0.08), fill_value=0.5, value_range=(0.0, 1.0), seed=seed
            ),
        ]
    return keras.Sequential(steps, name="augmentation")


def conv_block(x, filters: int, convolutions: int, dropout_rate: float, name: str, stride: int = 1):
    """Conv -> BatchNorm -> ReLU (repeated), then MaxPool and dropout: the seed's block."""
    for index in range(convolutions):
        x = layers.Conv2D(
            filters, 5 if stride > 1 else 3, strides=stride if index == 0 else 1,
            padding="same", use_bias=False, name=f"{name}_conv{index}",
        )(x)
        x = layers.BatchNormalization(name=f"{name}_bn{index}")(x)
        x = layers.ReLU(name=f"{name}_relu{index}")(x)
    x = layers.MaxPooling2D(2, name=f"{name}_pool")(x)
    if dropout_rate > 0:
        x = layers.SpatialDropout2D(dropout_rate, name=f"{name}_dropout")(x)
    return x


def build_cnn(
    filters: tuple[int, ...] = (24, 48, 96, 128, 256),
    convolutions: tuple[int, ...] = (1, 1, 1, 2, 1),
    dropout_rate: float = 0.4,
    dense_units: int = 64,
) -> keras.Model:
    """The custom CNN. The first block's 5x5 convolution has stride 2, so the network works at
    112 px and below: about 0.3 GFLOPs per image, which trains in well under an hour on 2 cores.
    """
    inputs = input_layer()
    x = inputs
    for index, block_filters in enumerate(filters):
        x = conv_block(
            x, block_filters, convolutions[index] if index < len(convolutions) else 1,
            dropout_rate=0.0 if index < 2 else 0.1, name=f"block{index + 1}",
            stride=2 if index == 0 else 1,
        )
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout_rate, name="head_dropout")(x)
    x = layers.Dense(dense_units, activation="relu", name="head_dense")(x)
    x = layers.Dropout(dropout_rate / 2, name="head_dropout2")(x)
    outputs = layers.Dense(1, activation="sigmoid", name="pneumonia_probability")(x)
    return keras.Model(inputs, outputs, name="pneumonia_cnn")


def build_backbone(backbone: str, weights: str | None) -> keras.Model:
    """An ImageNet backbone without its top; `weights` is a local .h5 path, 'imagenet' or None."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {backbone!r}")
    constructor, kwargs = BACKBONES[backbone]
    shape = (contract.INPUT_HEIGHT, contract.INPUT_WIDTH, 3)
    return constructor(input_shape=shape, include_top=False, weights=weights, **kwargs)


def build_transfer(backbone: str, weights: str | None, dropout_rate: float = 0.3) -> keras.Model:
    """Grayscale -> 3 channels in [-1, 1] -> frozen ImageNet backbone -> new sigmoid head."""
    inputs = input_layer()
    x = layers.Concatenate(name="to_rgb")([inputs, inputs, inputs])
    x = layers.Rescaling(2.0, offset=-1.0, name="to_signed")(x)
    base = build_backbone(backbone, weights)
    base.trainable = False
    # training=False keeps batch-norm statistics fixed, also once the top blocks are unfrozen.
    x = base(x, training=False)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout_rate, name="head_dropout")(x)
    outputs = layers.Dense(1, activation="sigmoid", name="pneumonia_probability")(x)
    return keras.Model(inputs, outputs, name="pneumonia_transfer")


def unfreeze_top(model: keras.Model, layer_count: int) -> int:
    """Make the top `layer_count` backbone layers trainable, batch norm excepted; return count."""
    base = backbone_of(model)
    base.trainable = True
    trainable = 0
    cutoff = len(base.layers) - layer_count
    for index, layer in enumerate(base.layers):
        is_top = index >= cutoff
        layer.trainable = is_top and not isinstance(layer, layers.BatchNormalization)
        trainable += int(layer.trainable and bool(layer.weights))
    return trainable


def with_augmentation(model: keras.Model, seed: int, recipe: str = "standard") -> keras.Model:
    """The training-time wrapper: augmentation, then the model (weights shared)."""
    inputs = input_layer()
    outputs = model(build_augmentation(seed, recipe)(inputs))
    return keras.Model(inputs, outputs, name=f"{model.name}_training")
