// One-shot initiation of the production profile's replica set (docker-compose.yml, mongo-rs-init).
// Idempotent: a set that is already initiated is left alone. Exits non-zero when no primary is
// elected within two minutes, so the API replicas (which wait for this service) do not start.
const members = [
  { _id: 0, host: "mongo-rs-1:27017", priority: 2 },
  { _id: 1, host: "mongo-rs-2:27017", priority: 1 },
  { _id: 2, host: "mongo-rs-3:27017", priority: 1 },
];
let initiated = true;
try {
  rs.status();
} catch (error) {
  initiated = false; // NotYetInitialized
}
if (!initiated) {
  rs.initiate({ _id: "rs0", members: members });
  print("replica set rs0 initiated");
}
for (let second = 0; second < 120 && !db.hello().primary; second++) {
  sleep(1000);
}
const primary = db.hello().primary;
if (!primary) {
  print("no primary elected within 120 s");
  quit(1);
}
print("replica set rs0 has primary " + primary);
