"""Evaluating a model: its accuracy in eval mode (`evaluate`, what training prints after every epoch), the
weights to evaluate (the weight average when the run keeps one), and `--eval-only`: a saved model loaded
for evaluation and its report written beside the checkpoint (`report_checkpoint`), or the shipped
model's into the output folder (`report_pretrained`): by default a report of the predictions averaged
over each image's shifts (shift_average.py), as predict answers, with the one-pass accuracy beside it.
"""
import concurrent.futures
import contextlib
import dataclasses
from pathlib import Path

from .backend import get_backend
from .checkpoint import check_same_model, load_checkpoint
from .config import build_model, check_plot_dependency, load_data
from .pretrained import PRETRAINED_PATH
from .report import evaluation_report, write_report_json
from .run_folder import EVALUATION_NAME, make_output_folder
from .run_log import OutputError, log_line

MODEL_OPTIONS = ("patch_size", "dim", "depth", "heads", "mlp_dim")     # TrainConfig's options that shape the weights
# how the report's predictions were made, in its JSON
SHIFT_AVERAGE_TEXT = "probabilities averaged over the image and its 8 one-pixel shifts (shift_average.py)"
ONE_PASS_TEXT = "one forward pass"


def evaluate(model, images, labels, batch_size=500, *, replicas=(), pool=None, communicator=None):
    """Accuracy (a float in [0, 1]) in eval mode; restores each model's mode, also on an exception.

    With `replicas` (copies sharing the model's weights, as TrainStep keeps) and a thread `pool`,
    model k evaluates batches k, k + M, k + 2M, ... in its own thread (M models in all). With an MPI
    `communicator` (distributed.py; collective), each rank evaluates its contiguous slice of the
    images and the correct counts, integers, are summed over the ranks: the same accuracy as one
    process, exactly."""
    count = images.shape[0]
    if communicator is not None and communicator.size > 1:
        start, end = communicator.shard(count)
        images, labels = images[start:end], labels[start:end]
    models = [model, *replicas]
    batch_starts = list(range(0, images.shape[0], batch_size))

    def count_correct(index):
        correct = 0
        for start in batch_starts[index::len(models)]:
            logits = models[index].forward(images[start:start + batch_size])
            correct = correct + (logits.argmax(axis=1) == labels[start:start + batch_size]).sum()
        return correct

    with contextlib.ExitStack() as eval_mode:
        for one in models:
            eval_mode.enter_context(one.evaluating())
        if pool is None or len(models) == 1:
            correct = count_correct(0)
        else:
            futures = [pool.submit(count_correct, index) for index in range(len(models))]
            concurrent.futures.wait(futures)     # every thread done before the modes go back, also when one fails
            correct = sum(future.result() for future in futures)
    if communicator is not None and communicator.size > 1:
        correct = communicator.sum(int(correct))
    return float(correct) / count


def evaluated_weights(weight_average):
    """The context in which the model holds the weights to evaluate: the average when there is one."""
    return weight_average.in_place_of_weights() if weight_average is not None else contextlib.nullcontext()


def load_for_evaluation(path, config):
    """(checkpoint meta, model on config's device, data) for evaluating a saved model;
    the checkpoint's model configuration must match `config`'s."""
    config.validate()
    backend = get_backend(config.device)
    meta, model_state, _ = load_checkpoint(path, averaged=True)
    data = load_data(config, backend)
    model = build_model(config, data, training=False)
    check_same_model(path, meta["model_config"], model.config)
    model.load_state_dict(model_state)
    model.to(backend)
    return meta, model, data


def report_checkpoint(path, config, *, shift_average=True, log=log_line, folder=None):
    """The evaluation report of a saved model on the test set (report.EvaluationReport), what
    `train_mnist.py --eval-only` does: logs the test accuracy, then per-class accuracy and the
    confusion matrix as a table, and writes them to evaluation.json in `folder`, by default the
    checkpoint's folder (with config.plot, also confusion.png and misclassified.png there). Fixed
    names, like the other files of a run folder; the JSON names the checkpoint and its epoch. The
    shipped model is evaluated into another folder: the installed package may be read-only.

    The report is of the predictions averaged over each image's shifts (shift_average.py), as predict
    answers, with the accuracy of one forward pass (the number training printed) logged and recorded
    beside it; shift_average=False: of one forward pass alone."""
    check_plot_dependency(config)
    if folder is None:
        folder = Path(path).parent
    else:
        folder = Path(folder)
        make_output_folder(folder)                   # before loading: a bad folder costs no evaluation
    meta, model, data = load_for_evaluation(path, config)
    images, labels = data["test_images"], data["test_labels"]
    report = evaluation_report(model, images, labels, config.eval_batch_size, shift_average=shift_average)
    if shift_average:
        one_pass = evaluate(model, images, labels, config.eval_batch_size)
        log(f"test accuracy {report.accuracy:.2%} averaged over the image and its 8 one-pixel shifts; "
            f"{one_pass:.2%} in one forward pass, as training measures it ({path}, epoch {meta['epoch']})")
        how = dict(prediction=SHIFT_AVERAGE_TEXT, one_pass_accuracy=one_pass)
    else:
        log(f"test accuracy {report.accuracy:.2%} ({path}, epoch {meta['epoch']})")
        how = dict(prediction=ONE_PASS_TEXT)
    log(report.table())
    json_path = folder / EVALUATION_NAME
    try:
        write_report_json(json_path, report, checkpoint=str(path), epoch=meta["epoch"], split="test", **how)
        log(f"wrote {json_path}")
        if config.plot:
            from .plots import write_evaluation_plots
            for plot_path in write_evaluation_plots(folder, report, data["test_images"]):
                log(f"wrote {plot_path}")
    except OSError as error:
        raise OutputError(f"cannot write the evaluation report into {folder}: "
                          f"{error.strerror or error}") from None
    return report


def report_pretrained(config, *, shift_average=True, log=log_line):
    """report_checkpoint of the model shipped in the package (pretrained.py), with that model's own
    model options whatever `config` says, written into config.out_dir: never beside the shipped file,
    since the installed package may be read-only."""
    model_config = load_checkpoint(PRETRAINED_PATH)[0]["model_config"]
    config = dataclasses.replace(config, **{name: model_config[name] for name in MODEL_OPTIONS})
    return report_checkpoint(PRETRAINED_PATH, config, shift_average=shift_average, log=log, folder=config.out_dir)
